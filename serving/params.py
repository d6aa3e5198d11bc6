"""The request schema: `GenerationParams`, the one dataclass every layer derives a request from,
and `validate`, the one check of a request against a service's `RequestLimits`.

Each field's metadata names the codec that moves it to and from `bagel.v1.GenerationParams` and
checks a caller's value, its command-line help, and its valid range. The proto conversion, the
client's keyword arguments, the CLI flags, validation and the message rank 0 sends the other
ranks are all derived from these fields: a new request field is one line here plus one line in
`params.proto`. Fields travel by name, never by position, so the dataclass may list them in any
order (the CLI's `--help` follows this order).
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
    EnumNameCodec,
    FloatCodec,
    IntCodec,
    IntervalCodec,
    Range,
    StringCodec,
    fields_from_message,
    fields_to_message,
    spec,
)
from serving.errors import InvalidParams

# The policies every caller names, re-exported so the schema is one import.
from step_cache.policies.dbcache import DBCache as DBCache
from step_cache.policies.none import NoCache as NoCache
from step_cache.policies.teacache import TeaCache as TeaCache
from step_cache.policy import PolicyConfig
from step_cache.registry import POLICIES

MAX_NEGATIVE_PROMPT_CHARS = 16_384
MAX_SEED = 2**63 - 1
MAX_PARTIAL_IMAGES = 3


# Step-cache policies live in the `step_cache` package, one module each, registered by the name
# their `CacheConfig.policy` oneof member has; the codec reads the registry at each use.
CachePolicy = PolicyConfig
CACHE_POLICIES = POLICIES
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

    @classmethod
    def from_proto(
        cls, msg: params_pb2.GenerationParams, defaults: Mapping[str, Any] | None = None
    ) -> GenerationParams:
        """Unset fields take `defaults` where given (e.g. an edit's), else the defaults above; an
        unset seed becomes a random one. Raises InvalidParams for a value no field can hold (call
        `validate` for the service's limits)."""
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
    return CACHE_SPEC.display_name(policy)


@dataclass(frozen=True)
class RequestLimits:
    """What a service allows one request, from its model: image sides that are positive multiples
    of `pixel_step` and at most `max_side` pixels (both ends inclusive: `pixel_step` and
    `max_side` themselves pass), and a step cache that leaves at least one of the model's
    `num_layers` transformer blocks to cache. Which cache policies a request may name is the
    policy registry's to say (the `cache` field's codec)."""

    pixel_step: int
    max_side: int
    num_layers: int


def validate(params: GenerationParams, limits: RequestLimits) -> None:
    """The one check of a request's parameters: raise InvalidParams naming the first bad field.

    Checks the image size against the limits, every field's codec and range (the cache policy
    among them: a registered one), the CFG interval, and that the cache policy leaves a block to
    cache. An unset cache passes: the diffusion service fills in its default before validating.
    """
    step, most = limits.pixel_step, limits.max_side
    for name in ("height", "width"):
        value = getattr(params, name)
        if not isinstance(value, int) or value <= 0 or value % step or value > most:
            raise InvalidParams(
                f"{name}={value!r} must be a positive multiple of {step} and at most {most}"
            )
    for path, value, meta in walk(params):
        meta["codec"].check(path, value)
        if meta["bounds"] is not None:
            meta["bounds"].check(path, value)
    lo, hi = params.cfg_interval
    if not lo <= hi:
        raise InvalidParams(f"cfg_interval={params.cfg_interval!r} must satisfy lo <= hi")
    if params.cache is not None:
        params.cache.check_fits(limits.num_layers)
