"""Request parameters between the wire (`bagel.v1.GenerationParams`) and the model's
`GenerationParams`: the one place that fills server defaults and rejects bad values.

Both services call it before any compute, so a bad request fails with INVALID_ARGUMENT at the
prefill service and again, for any other sender, at the diffusion service.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from bagel.config import BagelConfig
from bagel.params import RENORM_TYPES, GenerationParams, InvalidParams
from protos import params_pb2

_RENORM_FROM_WIRE = {
    params_pb2.CFG_RENORM_TYPE_GLOBAL: "global",
    params_pb2.CFG_RENORM_TYPE_CHANNEL: "channel",
    params_pb2.CFG_RENORM_TYPE_TEXT_CHANNEL: "text_channel",
}
_RENORM_TO_WIRE = {v: k for k, v in _RENORM_FROM_WIRE.items()}
MAX_NEGATIVE_PROMPT_CHARS = 16_384


@dataclass(frozen=True)
class RequestOptions:
    """Everything a request asks for beyond its prompt."""

    params: GenerationParams
    negative_prompt: str = ""
    latents_only: bool = False  # OUTPUT_FORMAT_LATENTS: raw latents instead of a PNG


def options_from_proto(msg: params_pb2.GenerationParams, config: BagelConfig) -> RequestOptions:
    """Fill defaults, pick a seed if none was given, validate; raises InvalidParams."""
    defaults = GenerationParams()
    values: dict = {}
    for name in (
        "height",
        "width",
        "num_timesteps",
        "timestep_shift",
        "cfg_text_scale",
        "cfg_img_scale",
        "cfg_renorm_min",
        "seed",
    ):
        values[name] = getattr(msg, name) if msg.HasField(name) else getattr(defaults, name)
    if not msg.HasField("seed"):
        values["seed"] = secrets.randbelow(2**31)
    if msg.HasField("cfg_interval"):
        values["cfg_interval"] = (msg.cfg_interval.lo, msg.cfg_interval.hi)
    if msg.cfg_renorm_type != params_pb2.CFG_RENORM_TYPE_UNSPECIFIED:
        if msg.cfg_renorm_type not in _RENORM_FROM_WIRE:
            raise InvalidParams(f"cfg_renorm_type={msg.cfg_renorm_type} is not a known renorm type")
        values["cfg_renorm_type"] = _RENORM_FROM_WIRE[msg.cfg_renorm_type]
    policy = msg.cache.WhichOneof("policy") if msg.HasField("cache") else None
    if policy not in (None, "none"):
        raise InvalidParams(
            f"cache.{policy} is not available in this release; leave cache unset or use cache.none"
        )
    if msg.output_format not in (
        params_pb2.OUTPUT_FORMAT_UNSPECIFIED,
        params_pb2.OUTPUT_FORMAT_PNG,
        params_pb2.OUTPUT_FORMAT_LATENTS,
    ):
        raise InvalidParams(f"output_format={msg.output_format} is not a known format")
    if len(msg.negative_prompt) > MAX_NEGATIVE_PROMPT_CHARS:
        raise InvalidParams(
            f"negative_prompt is longer than {MAX_NEGATIVE_PROMPT_CHARS} characters"
        )
    params = GenerationParams(**values)
    params.validate(config)
    return RequestOptions(
        params=params,
        negative_prompt=msg.negative_prompt,
        latents_only=msg.output_format == params_pb2.OUTPUT_FORMAT_LATENTS,
    )


def options_to_proto(options: RequestOptions) -> params_pb2.GenerationParams:
    """Every field set explicitly, so the receiver applies no defaults of its own."""
    p = options.params
    assert p.cfg_renorm_type in RENORM_TYPES
    return params_pb2.GenerationParams(
        height=p.height,
        width=p.width,
        num_timesteps=p.num_timesteps,
        timestep_shift=p.timestep_shift,
        cfg_text_scale=p.cfg_text_scale,
        cfg_img_scale=p.cfg_img_scale,
        cfg_interval=params_pb2.CfgInterval(lo=p.cfg_interval[0], hi=p.cfg_interval[1]),
        cfg_renorm_type=_RENORM_TO_WIRE[p.cfg_renorm_type],
        cfg_renorm_min=p.cfg_renorm_min,
        seed=p.seed,
        negative_prompt=options.negative_prompt,
        cache=params_pb2.CacheConfig(none=params_pb2.NoCache()),
        output_format=(
            params_pb2.OUTPUT_FORMAT_LATENTS
            if options.latents_only
            else params_pb2.OUTPUT_FORMAT_PNG
        ),
    )
