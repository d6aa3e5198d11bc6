"""A request with every field of the schema set to a value other than its default, and the
command line that asks for it; shared by the tests that follow a request through every layer."""

from __future__ import annotations

import dataclasses

from serving.params import DBCache, GenerationParams

# Valid for the tiny checkpoint (4 layers: Fn + Bn = 3 leaves one block to cache). The floats are
# exact in binary, and the seed needs more than 32 bits.
EVERY_FIELD = GenerationParams(
    height=64,
    width=96,
    num_timesteps=12,
    timestep_shift=2.5,
    cfg_text_scale=5.0,
    cfg_img_scale=2.0,
    cfg_interval=(0.25, 0.75),
    cfg_renorm_type="text_channel",
    cfg_renorm_min=0.125,
    seed=123_456_789_012,
    negative_prompt="blurry, low quality",
    cache=DBCache(
        fn_compute_blocks=2,
        bn_compute_blocks=1,
        max_warmup_steps=3,
        max_cached_steps=5,
        max_continuous_cached_steps=2,
        residual_diff_threshold=0.125,
        taylorseer_order=2,
    ),
    output_format="latents",
    partial_images=2,
)

# `python -m client generate PROMPT -o OUT` flags for EVERY_FIELD, plus a request id.
EVERY_FIELD_FLAGS = [
    "--height", "64",
    "--width", "96",
    "--steps", "12",
    "--timestep-shift", "2.5",
    "--cfg-text", "5",
    "--cfg-img-scale", "2",
    "--cfg-interval", "0.25", "0.75",
    "--cfg-renorm-type", "text_channel",
    "--cfg-renorm-min", "0.125",
    "--seed", "123456789012",
    "--negative", "blurry, low quality",
    "--cache",
    "dbcache:fn=2,bn=1,warmup=3,max_cached=5,max_continuous=2,threshold=0.125+taylorseer:order=2",
    "--output-format", "latents",
    "--partial-images", "2",
    "--request-id", "every-field-1",
]  # fmt: skip


def fields_left_at_default(params) -> list[str]:
    """Dotted names of the fields (nested policy fields included) that hold their default."""
    same = []
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if value == default:
            same.append(f.name)
        if dataclasses.is_dataclass(value) and type(value) is not type(default):
            same += [f"{f.name}.{n}" for n in fields_left_at_default(value)]
    return same
