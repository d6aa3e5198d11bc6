"""Prometheus metrics of the prefill service: the shared request and phase metrics (phases
`prefill`, `kv_send`, `total`), plus calls in flight and KV bytes sent."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from serving.metrics import ServiceMetrics


class PrefillMetrics(ServiceMetrics):
    def __init__(self) -> None:
        super().__init__("prefill")
        self.in_flight = Gauge(
            "bagel_prefill_requests_in_flight",
            "Prefill.Generate calls running now",
            registry=self.registry,
        )
        self.kv_bytes = Counter(
            "bagel_prefill_kv_bytes_sent",
            "Bytes of KV frames written to the diffusion service",
            registry=self.registry,
        )
