"""Prometheus metrics of the diffusion service, served on --metrics-port when given."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


@dataclass
class ServiceMetrics:
    registry: CollectorRegistry
    requests: Counter  # by final gRPC status
    phase_seconds: Histogram  # receive, broadcast, denoise, decode
    kv_bytes: Counter
    queue_depth: Gauge
    steps: Counter  # by cached="true"/"false"
    restarts: Counter

    @classmethod
    def create(cls) -> ServiceMetrics:
        r = CollectorRegistry()
        return cls(
            registry=r,
            requests=Counter(
                "bagel_diffusion_requests", "Requests by final status", ["status"], registry=r
            ),
            phase_seconds=Histogram(
                "bagel_diffusion_phase_seconds", "Wall time per phase", ["phase"], registry=r
            ),
            kv_bytes=Counter("bagel_diffusion_kv_bytes", "KV cache bytes received", registry=r),
            queue_depth=Gauge("bagel_diffusion_queue_depth", "Requests waiting", registry=r),
            steps=Counter("bagel_diffusion_steps", "Denoising steps", ["cached"], registry=r),
            restarts=Counter("bagel_diffusion_rank_restarts", "Rank group restarts", registry=r),
        )

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)
