"""The diffusion service's settings, parsed once from the command line and shared by every rank:
one dataclass, each field one flag (`serving.flags`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from bagel.network.attention import AttentionPrecision
from bagel.network.fp8 import LinearPrecision
from diffusion_service.parallel.config import ParallelConfig
from diffusion_service.presets import DEFAULT_PRESET, PRESET_HELP, PRESETS, preset_changes
from serving import flags
from serving.flags import FieldPath, detected, group, option
from serving.params import CACHE_SPEC, CachePolicy, NoCache
from serving.service.cuda_allocator import cuda_allocator_option
from serving.settings import GrpcServiceSettings


def started_by_torchrun(env: Mapping[str, str] = os.environ) -> bool:
    return "TORCHELASTIC_RUN_ID" in env or (
        "RANK" in env and "WORLD_SIZE" in env and "MASTER_ADDR" in env
    )


@dataclass(frozen=True)
class ServiceSettings(GrpcServiceSettings):
    """BAGEL diffusion service: receives a KV cache, denoises on all ranks, streams the image."""

    listen: str = option("HOST:PORT to serve on", default="127.0.0.1:50052")
    # Applied when the flags are read (`parse_settings`): the fields below hold its values.
    preset: str = option(PRESET_HELP, default=DEFAULT_PRESET, choices=tuple(PRESETS))
    # --ulysses, --ring, --cfg-parallel, --sp-attention, --kv-gather
    parallel: ParallelConfig = group(ParallelConfig)
    device: str = option(
        "where the model runs: cpu (fp32) or cuda (bf16, one GPU per rank)",
        default="cpu",
        choices=("cpu", "cuda"),
    )
    linear_precision: LinearPrecision = option(
        "weights of the decoder's linear layers: bf16 (exact default) or fp8 (e4m3, quantized "
        "at load; activations quantized per token inside the fused kernels)",
        default="bf16",
    )
    attention_precision: AttentionPrecision = option(
        "how the generation block's queries attend to the prefix and latent keys: bf16 (exact "
        "default) or fp8 (opt-in: Q·K^T and P·V in e4m3 with per-block scales, trading "
        "accuracy for speed on FP8 tensor cores; the prefill's text attention stays bf16)",
        default="bf16",
    )
    cuda_allocator: str = cuda_allocator_option()
    max_queue: int = option("requests waiting beyond the running one", default=8)
    # An edit of a 1024x1024 image with two 2048-token prompts sends 1.38 GB (docs/editing.md).
    max_kv_bytes: int = option("largest KV cache accepted", default=2 << 30)
    max_inflight_kv_bytes: int = option(
        "bytes all KV uploads in flight may hold together; beyond: RESOURCE_EXHAUSTED",
        default=4 << 30,
    )
    kv_idle_timeout_s: float = option(
        "seconds an upload may go without sending a frame; then DEADLINE_EXCEEDED", default=30.0
    )
    kv_first_frame_timeout_s: float = option(
        "seconds an upload may take to send its header; then DEADLINE_EXCEEDED", default=5.0
    )
    # An upload silent this long (or slower than transport.admission's minimum rate) gives its
    # room to one that does not fit; a newcomer waits this long for room.
    kv_stall_s: float = option(
        "seconds without a frame after which an upload gives its room in --max-inflight-kv-bytes "
        "to one that needs it (it ends RESOURCE_EXHAUSTED); also how long a new upload waits "
        "for room",
        default=1.0,
        flag="kv-stall-timeout",
    )
    default_cache: CachePolicy = option(
        "step-cache policy of requests that set none, e.g. dbcache:fn=4,warmup=8,threshold=0.2 "
        "(default: none)",
        default=NoCache(),
        metavar="SPEC",
        parse=CACHE_SPEC.parse,
    )
    collective_timeout_s: float = option(
        "seconds any collective may take before the group counts as failed", default=60.0
    )
    heartbeat_s: float = option(
        "seconds the idle engine waits between probes of the ranks", default=2.0
    )
    torchrun: bool = detected(
        "ranks started by torchrun (env:// rendezvous) instead of by this service",
        started_by_torchrun,
        default=False,
    )

    @property
    def world_size(self) -> int:
        return self.parallel.world_size

    @property
    def collective_timeout(self) -> timedelta:
        return timedelta(seconds=self.collective_timeout_s)


def apply_preset(settings: ServiceSettings, given: frozenset[FieldPath]) -> ServiceSettings:
    """`settings` with its preset's values in the fields the command line did not name."""
    changes = preset_changes(settings.preset, given, settings.device, settings.torchrun)
    return dataclasses.replace(settings, **changes)


def parse_settings(argv: list[str] | None = None) -> ServiceSettings:
    return flags.parse_settings(
        ServiceSettings, "python -m diffusion_service", argv, resolve=apply_preset
    )
