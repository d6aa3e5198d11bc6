"""Prometheus metrics of the prefill service: the shared request and phase metrics (phases
`prefill`, `kv_send`, `total`), plus calls in flight, KV bytes sent, and per diffusion service
(`--diffusion A,B,...`) the requests routed to it and whether it is serving."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from serving.service.metrics import ServiceMetrics


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
        self.routed = Counter(
            "bagel_prefill_routed_requests",
            "Requests sent to each diffusion service",
            ["diffusion"],
            registry=self.registry,
        )
        self.diffusion_serving = Gauge(
            "bagel_prefill_diffusion_serving",
            "1 while a diffusion service's last health check said SERVING, else 0",
            ["diffusion"],
            registry=self.registry,
        )
