"""The request schema: `GenerationParams`, the one dataclass every layer derives a request from.

Each field's metadata names the codec that moves it to and from `bagel.v1.GenerationParams` and
checks a caller's value, its command-line help, and its valid range. The proto conversion, the
client's keyword arguments, the CLI flags, validation and the message rank 0 sends the other
ranks are all derived from these fields: a new request field is one line here plus one line in
`params.proto`.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from protos import params_pb2
from serving.codecs import (
    CachePolicyCodec,
    Codec,
    EnumNameCodec,
    FloatCodec,
    IntCodec,
    IntervalCodec,
    Range,
    StringCodec,
    enum_names,
    fields_from_message,
    fields_to_message,
)
from serving.errors import InvalidParams

MAX_NEGATIVE_PROMPT_CHARS = 16_384
MAX_SEED = 2**63 - 1
MAX_PARTIAL_IMAGES = 3
RENORM_TYPES = enum_names(params_pb2.CfgRenormType, "CFG_RENORM_TYPE_")  # global, channel, ...
OUTPUT_FORMATS = enum_names(params_pb2.OutputFormat, "OUTPUT_FORMAT_")  # png, latents


def spec(
    codec: Codec,
    help: str,
    *,
    flags: tuple[str, ...] = (),
    bounds: Range | None = None,
    key: str | None = None,
    zero_means_unlimited: bool = False,
) -> dict:
    """Field metadata: how the field travels, what `--help` says, extra CLI flag spellings, the
    valid range (None: the codec's own checks, or checked in `validate`), and for cache-policy
    fields their short key in a `--cache` spec and whether -1 there stands for 0 (no limit)."""
    return {
        "codec": codec,
        "help": help,
        "flags": flags,
        "bounds": bounds,
        "key": key,
        "zero_means_unlimited": zero_means_unlimited,
    }


TAYLORSEER = spec(
    IntCodec(),
    "TaylorSeer order of the reused residual's forecast (0: reuse it as it is)",
    bounds=Range(0, 2),
)


@dataclass(frozen=True)
class NoCache:
    """Every step runs the whole transformer."""


@dataclass(frozen=True)
class TeaCache:
    """Skip a step while the accumulated relative L1 change of the first block's input stays
    under the threshold."""

    rel_l1_threshold: float = field(
        default=0.2,
        metadata=spec(FloatCodec(), "TeaCache threshold", bounds=Range(0.0, 10.0), key="threshold"),
    )
    taylorseer_order: int = field(default=0, metadata=TAYLORSEER)


@dataclass(frozen=True)
class DBCache:
    """Cache-DiT's dual-block cache: the first Fn and last Bn blocks run every step; the middle
    blocks' residual is reused while the relative change of the first Fn blocks' residual stays
    under the threshold. A limit of 0 means no limit."""

    fn_compute_blocks: int = field(
        default=8,
        metadata=spec(
            IntCodec(),
            "DBCache Fn: blocks computed first, every step",
            bounds=Range(1, 1000),
            key="fn",
        ),
    )
    bn_compute_blocks: int = field(
        default=0,
        metadata=spec(
            IntCodec(),
            "DBCache Bn: blocks computed last, every step",
            bounds=Range(0, 1000),
            key="bn",
        ),
    )
    max_warmup_steps: int = field(
        default=8,
        metadata=spec(
            IntCodec(), "steps always computed at the start", bounds=Range(0, 1000), key="warmup"
        ),
    )
    max_cached_steps: int = field(
        default=0,
        metadata=spec(
            IntCodec(),
            "most steps served from the cache (0: no limit)",
            bounds=Range(0, 1000),
            key="max_cached",
            zero_means_unlimited=True,
        ),
    )
    max_continuous_cached_steps: int = field(
        default=0,
        metadata=spec(
            IntCodec(),
            "most cached steps in a row (0: no limit)",
            bounds=Range(0, 1000),
            key="max_continuous",
            zero_means_unlimited=True,
        ),
    )
    residual_diff_threshold: float = field(
        default=0.08,
        metadata=spec(
            FloatCodec(),
            "DBCache relative residual change threshold",
            bounds=Range(0.0, 10.0),
            key="threshold",
        ),
    )
    taylorseer_order: int = field(default=0, metadata=TAYLORSEER)


CachePolicy = NoCache | TeaCache | DBCache
# Each policy is one member of the `CacheConfig.policy` oneof, named as the proto names it.
CACHE_POLICIES: dict[str, type] = {"none": NoCache, "tea_cache": TeaCache, "db_cache": DBCache}
CACHE_SPEC = CachePolicyCodec(CACHE_POLICIES)  # parses `--cache` specs such as "dbcache:fn=4"


@dataclass(frozen=True)
class GenerationParams:
    """Everything a request asks for beyond its prompt. Defaults are BAGEL's text-to-image
    settings (CFG 4.0 / 1.5 on (0.4, 1], shift 3, 50 timesteps)."""

    height: int = field(
        default=1024, metadata=spec(IntCodec(), "image height in pixels (multiple of 16)")
    )
    width: int = field(
        default=1024, metadata=spec(IntCodec(), "image width in pixels (multiple of 16)")
    )
    num_timesteps: int = field(
        default=50,
        metadata=spec(
            IntCodec(),
            "number of timesteps of the schedule (the sampler takes one step fewer)",
            flags=("--steps",),
            bounds=Range(2, 1000),
        ),
    )
    timestep_shift: float = field(
        default=3.0,
        metadata=spec(FloatCodec(), "timestep shift", bounds=Range(0.0, 100.0, lo_open=True)),
    )
    cfg_text_scale: float = field(
        default=4.0,
        metadata=spec(
            FloatCodec(), "text CFG scale", flags=("--cfg-text",), bounds=Range(0.0, 100.0)
        ),
    )
    cfg_img_scale: float = field(
        default=1.5,
        metadata=spec(
            FloatCodec(), "image CFG scale", flags=("--cfg-img",), bounds=Range(0.0, 100.0)
        ),
    )
    cfg_interval: tuple[float, float] = field(
        default=(0.4, 1.0),
        metadata=spec(IntervalCodec(), "CFG applies for shifted t in (LO, HI]"),
    )
    cfg_renorm_type: str = field(
        default="global",
        metadata=spec(EnumNameCodec(params_pb2.CfgRenormType, "CFG_RENORM_TYPE_"), "CFG renorm"),
    )
    cfg_renorm_min: float = field(
        default=0.0,
        metadata=spec(FloatCodec(), "lower clamp of the CFG renorm scale", bounds=Range(0.0, 1.0)),
    )
    seed: int = field(
        default=0,
        metadata=spec(
            IntCodec(),
            "noise seed (unset or -1 through the client: the server picks one)",
            bounds=Range(0, MAX_SEED),
        ),
    )
    negative_prompt: str = field(
        default="",
        metadata=spec(
            StringCodec(MAX_NEGATIVE_PROMPT_CHARS),
            "negative prompt: the unconditional text context",
            flags=("--negative",),
        ),
    )
    cache: CachePolicy | None = field(
        default=None,
        metadata=spec(
            CACHE_SPEC,
            "step-cache policy (unset: the diffusion service's default)",
        ),
    )
    output_format: str = field(
        default="png",
        metadata=spec(EnumNameCodec(params_pb2.OutputFormat, "OUTPUT_FORMAT_"), "what comes back"),
    )
    partial_images: int = field(
        default=0,
        metadata=spec(
            IntCodec(),
            "previews sent while the image is denoised, at evenly spaced steps",
            bounds=Range(0, MAX_PARTIAL_IMAGES),
        ),
    )

    def with_cache_default(self, default: CachePolicy) -> GenerationParams:
        """These params with `default` where the request left the cache policy unset."""
        return self if self.cache is not None else dataclasses.replace(self, cache=default)

    def validate(self, pixel_step: int, max_side: int) -> None:
        """Raise InvalidParams naming the first bad field. `pixel_step` and `max_side` are the
        model's (a multiple of 16 and 1024 for BAGEL-7B-MoT)."""
        for name in ("height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0 or value % pixel_step or value > max_side:
                raise InvalidParams(
                    f"{name}={value!r} must be a positive multiple of {pixel_step} and at most "
                    f"{max_side}"
                )
        for path, value, meta in walk(self):
            meta["codec"].check(path, value)
            if meta["bounds"] is not None:
                meta["bounds"].check(path, value)
        lo, hi = self.cfg_interval
        if not lo <= hi:
            raise InvalidParams(f"cfg_interval={self.cfg_interval!r} must satisfy lo <= hi")

    @classmethod
    def from_proto(
        cls, msg: params_pb2.GenerationParams, defaults: Mapping[str, Any] | None = None
    ) -> GenerationParams:
        """Unset fields take `defaults` where given (e.g. an edit's), else the defaults above; an
        unset seed becomes a random one. Raises InvalidParams for a value no field can hold (call
        `validate` for the model's limits)."""
        values = {**(defaults or {}), **fields_from_message(cls, msg)}
        if not msg.HasField("seed"):
            values["seed"] = secrets.randbelow(2**31)
        return cls(**values)

    def to_proto(self) -> params_pb2.GenerationParams:
        """Every field set explicitly, so the receiver applies no defaults of its own."""
        return fields_to_message(self, params_pb2.GenerationParams())

    def to_bytes(self) -> bytes:
        return self.to_proto().SerializeToString(deterministic=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> GenerationParams:
        return cls.from_proto(params_pb2.GenerationParams.FromString(data))

    @property
    def latents_only(self) -> bool:
        return self.output_format == "latents"


def walk(params: Any, prefix: str = ""):
    """(dotted name, value, metadata) of every field, nested cache-policy fields included."""
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        yield prefix + f.name, value, f.metadata
        if dataclasses.is_dataclass(value):
            yield from walk(value, f"{prefix}{f.name}.")


def cache_policy_name(policy: CachePolicy | None) -> str:
    """The policy's name as a `--cache` spec starts (`none`, `teacache`, `dbcache`), with
    `+taylorseer` when it forecasts."""
    if policy is None:
        return "none"
    name = CACHE_SPEC.names[type(policy)].replace("_", "")
    return name + ("+taylorseer" if getattr(policy, "taylorseer_order", 0) else "")


def check_cache_fits(policy: CachePolicy, num_layers: int) -> None:
    """A DBCache's Fn + Bn must leave at least one of the model's `num_layers` blocks to cache."""
    if isinstance(policy, DBCache):
        used = policy.fn_compute_blocks + policy.bn_compute_blocks
        if used >= num_layers:
            raise InvalidParams(
                f"cache.fn_compute_blocks + cache.bn_compute_blocks = {used} leaves none of the "
                f"model's {num_layers} blocks to cache; the sum must be below {num_layers}"
            )
