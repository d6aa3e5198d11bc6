"""The diffusion service's settings, parsed once from the command line and shared by every rank."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

from bagel.fp8 import LINEAR_PRECISIONS, LinearPrecision
from diffusion_service.parallel.config import ParallelConfig
from serving.params import CACHE_SPEC, CachePolicy, NoCache
from serving.security import ServerSecurity
from serving.settings import (
    DEFAULT_METRICS_HOST,
    DefaultsHelpFormatter,
    add_server_security_arguments,
    default,
    server_security_from_args,
)


@dataclass(frozen=True)
class ServiceSettings:
    model_dir: str
    listen: str = "127.0.0.1:50052"
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: str = "cpu"
    linear_precision: LinearPrecision = "bf16"  # "fp8": e4m3 linear layers (bagel.fp8)
    max_queue: int = 8
    # An edit of a 1024x1024 image with two 2048-token prompts sends 1.38 GB (docs/editing.md).
    max_kv_bytes: int = 2 << 30
    max_inflight_kv_bytes: int = 4 << 30  # held by all uploads in flight together
    kv_idle_timeout_s: float = 30.0  # longest wait for the next frame of an upload
    kv_first_frame_timeout_s: float = 5.0  # longest wait for an upload's header
    # An upload silent this long (or slower than transport.admission's minimum rate) gives its
    # room to one that does not fit; a newcomer waits this long for room.
    kv_stall_s: float = 1.0
    default_cache: CachePolicy = NoCache()  # for requests that leave the cache policy unset
    metrics_host: str = DEFAULT_METRICS_HOST
    metrics_port: int | None = None
    collective_timeout_s: float = 60.0
    heartbeat_s: float = 2.0
    drain_s: float = 10.0
    torchrun: bool = False  # ranks started by torchrun (env:// rendezvous) instead of by us
    security: ServerSecurity = field(default_factory=ServerSecurity)  # TLS/mTLS, bearer token

    @property
    def world_size(self) -> int:
        return self.parallel.world_size

    @property
    def collective_timeout(self) -> timedelta:
        return timedelta(seconds=self.collective_timeout_s)


def build_parser() -> argparse.ArgumentParser:
    s, p = ServiceSettings, ParallelConfig
    parser = argparse.ArgumentParser(
        formatter_class=DefaultsHelpFormatter,
        prog="python -m diffusion_service",
        description="BAGEL diffusion service: receives a KV cache, denoises on all ranks, streams the image.",
    )
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--listen", default=default(s, "listen"), help="HOST:PORT to serve on")
    parser.add_argument(
        "--ulysses",
        type=int,
        default=default(p, "ulysses"),
        help="Ulysses degree (divides the KV heads)",
    )
    parser.add_argument("--ring", type=int, default=default(p, "ring"), help="Ring degree")
    parser.add_argument(
        "--cfg-parallel", type=int, default=default(p, "cfg_parallel"), help="CFG-parallel degree"
    )
    parser.add_argument(
        "--kv-gather",
        type=int,
        default=default(p, "kv_gather"),
        help="KV all-gather degree: the inner group splits the latents and gathers only K and V "
        "(instead of --ulysses; composes with --ring and --cfg-parallel)",
    )
    parser.add_argument(
        "--sp-attention",
        default=default(p, "sp_attention"),
        help="SP attention variant by name (default: the one the degrees imply)",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=default(s, "device"),
        help="where the model runs: cpu (fp32) or cuda (bf16, one GPU per rank)",
    )
    parser.add_argument(
        "--linear-precision",
        choices=LINEAR_PRECISIONS,
        default=default(s, "linear_precision"),
        help="weights of the decoder's linear layers: bf16 (exact default) or fp8 (e4m3, "
        "quantized at load; activations quantized per token inside the fused kernels)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=default(s, "max_queue"),
        help="requests waiting beyond the running one",
    )
    parser.add_argument(
        "--max-kv-bytes",
        type=int,
        default=default(s, "max_kv_bytes"),
        help="largest KV cache accepted",
    )
    parser.add_argument(
        "--max-inflight-kv-bytes",
        type=int,
        default=default(s, "max_inflight_kv_bytes"),
        help="bytes all KV uploads in flight may hold together; beyond: RESOURCE_EXHAUSTED",
    )
    parser.add_argument(
        "--kv-idle-timeout",
        type=float,
        default=default(s, "kv_idle_timeout_s"),
        help="seconds an upload may go without sending a frame; then DEADLINE_EXCEEDED",
    )
    parser.add_argument(
        "--kv-first-frame-timeout",
        type=float,
        default=default(s, "kv_first_frame_timeout_s"),
        help="seconds an upload may take to send its header; then DEADLINE_EXCEEDED",
    )
    parser.add_argument(
        "--kv-stall-timeout",
        type=float,
        default=default(s, "kv_stall_s"),
        help="seconds without a frame after which an upload gives its room in "
        "--max-inflight-kv-bytes to one that needs it (it ends RESOURCE_EXHAUSTED); also how "
        "long a new upload waits for room",
    )
    parser.add_argument(
        "--default-cache",
        type=CACHE_SPEC.parse,
        default=default(s, "default_cache"),
        metavar="SPEC",
        help="step-cache policy of requests that set none, e.g. dbcache:fn=4,warmup=8,threshold=0.2"
        " (default: none)",
    )
    parser.add_argument(
        "--metrics-host", default=default(s, "metrics_host"), help="address metrics bind to"
    )
    parser.add_argument("--metrics-port", type=int, default=None, help="Prometheus metrics port")
    parser.add_argument(
        "--collective-timeout",
        type=float,
        default=default(s, "collective_timeout_s"),
        help="seconds any collective may take before the group counts as failed",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=default(s, "drain_s"),
        help="seconds to finish work on SIGTERM",
    )
    add_server_security_arguments(parser, allowed_clients=True)
    return parser


def started_by_torchrun(env: Mapping[str, str] = os.environ) -> bool:
    return "TORCHELASTIC_RUN_ID" in env or (
        "RANK" in env and "WORLD_SIZE" in env and "MASTER_ADDR" in env
    )


def parse_settings(argv: list[str] | None = None) -> ServiceSettings:
    args = build_parser().parse_args(argv)
    return ServiceSettings(
        model_dir=args.model,
        listen=args.listen,
        parallel=ParallelConfig(
            ulysses=args.ulysses,
            ring=args.ring,
            cfg_parallel=args.cfg_parallel,
            sp_attention=args.sp_attention,
            kv_gather=args.kv_gather,
        ),
        device=args.device,
        linear_precision=args.linear_precision,
        max_queue=args.max_queue,
        max_kv_bytes=args.max_kv_bytes,
        max_inflight_kv_bytes=args.max_inflight_kv_bytes,
        kv_idle_timeout_s=args.kv_idle_timeout,
        kv_first_frame_timeout_s=args.kv_first_frame_timeout,
        kv_stall_s=args.kv_stall_timeout,
        default_cache=args.default_cache,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        collective_timeout_s=args.collective_timeout,
        drain_s=args.drain_timeout,
        torchrun=started_by_torchrun(),
        security=server_security_from_args(args),
    )
