"""Prometheus metrics of the prefill service: requests by status, latency per phase, KV bytes sent.

Each server owns its registry (no process-global metric state), served on `--metrics-port`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class PrefillMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "bagel_prefill_requests",
            "Prefill.Generate calls by final gRPC status",
            ["code"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "bagel_prefill_requests_in_flight",
            "Prefill.Generate calls running now",
            registry=self.registry,
        )
        self.prefill_seconds = Histogram(
            "bagel_prefill_compute_seconds",
            "Time computing a request's KV cache (all CFG contexts)",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.kv_send_seconds = Histogram(
            "bagel_prefill_kv_send_seconds",
            "From the first KV frame written to the last one accepted by gRPC",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "bagel_prefill_request_seconds",
            "Whole Prefill.Generate calls, image included",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.kv_bytes = Counter(
            "bagel_prefill_kv_bytes_sent",
            "Bytes of KV frames written to the diffusion service",
            registry=self.registry,
        )
        self._http = None

    def serve(self, host: str, port: int) -> None:
        """Expose the registry over HTTP at http://host:port/metrics."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
