"""Prometheus metrics of the diffusion service: the shared request and phase metrics (phases
`receive`, `broadcast`, `denoise`, `decode`), plus KV bytes received, queue depth, denoising steps
(by whether the step cache served them) and rank-group restarts."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from serving.metrics import ServiceMetrics


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
