"""Prometheus metrics of the diffusion service: the shared request and phase metrics (phases
`receive`, `broadcast`, `denoise`, `decode`), plus KV bytes received, queue depth, denoising steps
(by whether the step cache served them), rank-group restarts, and KV uploads in flight, the bytes
they reserve and those evicted (`transport.admission`)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from serving.service.metrics import ServiceMetrics


class DiffusionMetrics(ServiceMetrics):
    def __init__(self) -> None:
        super().__init__("diffusion")
        r = self.registry
        self.kv_bytes = Counter("bagel_diffusion_kv_bytes", "KV cache bytes received", registry=r)
        self.queue_depth = Gauge("bagel_diffusion_queue_depth", "Requests waiting", registry=r)
        self.steps = Counter(
            "bagel_diffusion_steps",
            "Denoising steps by step-cache policy, computed (cached=false) or reused (true)",
            ["policy", "cached"],
            registry=r,
        )
        self.restarts = Counter("bagel_diffusion_rank_restarts", "Rank group restarts", registry=r)
        self.kv_uploads = Gauge(
            "bagel_diffusion_kv_uploads_in_flight", "KV uploads holding room now", registry=r
        )
        self.kv_upload_bytes = Gauge(
            "bagel_diffusion_kv_upload_reserved_bytes",
            "Bytes the KV uploads in flight reserve (at most --max-inflight-kv-bytes)",
            registry=r,
        )
        self.kv_evictions = Counter(
            "bagel_diffusion_kv_uploads_evicted",
            "Stale KV uploads that gave their room to another",
            registry=r,
        )
