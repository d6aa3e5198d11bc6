"""The metrics every service exposes, on a registry of its own (no process-global state), with
the same names and labels in both services: `bagel_<service>_requests_total{code=...}` by final
gRPC status code, `bagel_<service>_phase_seconds{phase=...}`, `bagel_<service>_model_load_seconds`,
`bagel_<service>_auth_failures_total{reason=...}` (calls refused by `serving.service.access`) and, on GPUs, `bagel_<service>_peak_memory_bytes{rank=...,kind="reserved"|"allocated"}`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServiceMetrics:
    def __init__(self, service: str) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            f"bagel_{service}_requests",
            "Generate calls by final gRPC status code",
            ["code"],
            registry=self.registry,
        )
        self.phase_seconds = Histogram(
            f"bagel_{service}_phase_seconds",
            "Wall time per phase of a request",
            ["phase"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.model_load_seconds = Gauge(
            f"bagel_{service}_model_load_seconds",
            "Seconds from the start of loading to serving (weights, and the diffusion ranks)",
            registry=self.registry,
        )
        # Set by the service from torch.cuda's peak statistics (serving/ does not import torch).
        self.peak_memory_bytes = Gauge(
            f"bagel_{service}_peak_memory_bytes",
            "Peak GPU memory of a rank since it started: reserved by the caching allocator, or "
            "allocated to tensors",
            ["rank", "kind"],
            registry=self.registry,
        )
        self.auth_failures = Counter(
            f"bagel_{service}_auth_failures",
            "Calls refused before they ran: missing_token, invalid_token, client_not_allowed",
            ["reason"],
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
