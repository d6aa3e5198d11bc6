"""The diffusion service's settings, parsed once from the command line and shared by every rank:
one dataclass, each field one flag (`serving.flags`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from datetime import timedelta

from bagel.fp8 import LinearPrecision
from diffusion_service.parallel.config import ParallelConfig
from diffusion_service.torchrun import started_by_torchrun
from serving import flags
from serving.flags import detected, group, option
from serving.params import CACHE_SPEC, CachePolicy, NoCache
from serving.settings import GrpcServiceSettings

PROG = "python -m diffusion_service"
DESCRIPTION = (
    "BAGEL diffusion service: receives a KV cache, denoises on all ranks, streams the image."
)


@dataclass(frozen=True)
class ServiceSettings(GrpcServiceSettings):
    listen: str = field(default="127.0.0.1:50052", metadata=option("HOST:PORT to serve on"))
    # --ulysses, --ring, --cfg-parallel, --sp-attention, --kv-gather
    parallel: ParallelConfig = field(default_factory=ParallelConfig, metadata=group())
    device: str = field(
        default="cpu",
        metadata=option(
            "where the model runs: cpu (fp32) or cuda (bf16, one GPU per rank)",
            choices=("cpu", "cuda"),
        ),
    )
    linear_precision: LinearPrecision = field(
        default="bf16",
        metadata=option(
            "weights of the decoder's linear layers: bf16 (exact default) or fp8 (e4m3, "
            "quantized at load; activations quantized per token inside the fused kernels)"
        ),
    )
    max_queue: int = field(default=8, metadata=option("requests waiting beyond the running one"))
    # An edit of a 1024x1024 image with two 2048-token prompts sends 1.38 GB (docs/editing.md).
    max_kv_bytes: int = field(default=2 << 30, metadata=option("largest KV cache accepted"))
    max_inflight_kv_bytes: int = field(
        default=4 << 30,
        metadata=option(
            "bytes all KV uploads in flight may hold together; beyond: RESOURCE_EXHAUSTED"
        ),
    )
    kv_idle_timeout_s: float = field(
        default=30.0,
        metadata=option(
            "seconds an upload may go without sending a frame; then DEADLINE_EXCEEDED",
            flag="kv-idle-timeout",
        ),
    )
    kv_first_frame_timeout_s: float = field(
        default=5.0,
        metadata=option(
            "seconds an upload may take to send its header; then DEADLINE_EXCEEDED",
            flag="kv-first-frame-timeout",
        ),
    )
    # An upload silent this long (or slower than transport.admission's minimum rate) gives its
    # room to one that does not fit; a newcomer waits this long for room.
    kv_stall_s: float = field(
        default=1.0,
        metadata=option(
            "seconds without a frame after which an upload gives its room in "
            "--max-inflight-kv-bytes to one that needs it (it ends RESOURCE_EXHAUSTED); also how "
            "long a new upload waits for room",
            flag="kv-stall-timeout",
        ),
    )
    default_cache: CachePolicy = field(
        default=NoCache(),
        metadata=option(
            "step-cache policy of requests that set none, e.g. "
            "dbcache:fn=4,warmup=8,threshold=0.2 (default: none)",
            metavar="SPEC",
            parse=CACHE_SPEC.parse,
        ),
    )
    collective_timeout_s: float = field(
        default=60.0,
        metadata=option(
            "seconds any collective may take before the group counts as failed",
            flag="collective-timeout",
        ),
    )
    heartbeat_s: float = field(
        default=2.0,
        metadata=option(
            "seconds the idle engine waits between probes of the ranks", flag="heartbeat-interval"
        ),
    )
    torchrun: bool = field(
        default=False,
        metadata=detected(
            "ranks started by torchrun (env:// rendezvous) instead of by this service",
            started_by_torchrun,
        ),
    )

    @property
    def world_size(self) -> int:
        return self.parallel.world_size

    @property
    def collective_timeout(self) -> timedelta:
        return timedelta(seconds=self.collective_timeout_s)


def build_parser() -> argparse.ArgumentParser:
    return flags.build_parser(ServiceSettings, PROG, DESCRIPTION)


def parse_settings(argv: list[str] | None = None) -> ServiceSettings:
    return flags.parse_settings(ServiceSettings, build_parser(), argv)
