"""The HTTP request bodies: OpenAI's image fields, plus every `GenerationParams` field by its
schema name (what the `openai` SDK's `extra_body` sends), and think mode (`think` with the plan's
`think_*` sampling fields of `TextSampling`, as the gRPC request takes them), derived from the
schemas and their codecs: the type each codec carries in JSON, the help as the description, the
bounds as constraints."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from client.request import THINK_PREFIX
from serving.codecs import IntervalCodec
from serving.params import GenerationParams
from serving.text_params import TextSampling

MAX_IMAGES = 4
IMAGE_FORMATS = ("png", "jpeg", "webp")
# Schema fields an OpenAI field stands for: `size` gives height and width; OpenAI's own
# `output_format` (png, jpeg, webp) replaces the schema's (png, latents: the gateway asks png).
COVERED_BY_OPENAI = frozenset({"height", "width", "output_format"})
SCHEMA_FIELDS = tuple(
    f for f in dataclasses.fields(GenerationParams) if f.name not in COVERED_BY_OPENAI
)
SCHEMA_FIELD_NAMES = tuple(f.name for f in SCHEMA_FIELDS)
THINK_FIELD = "think"
THINK_SAMPLING_FIELDS = tuple(dataclasses.fields(TextSampling))
# What `client.request.build_request` takes besides the schema: think and its plan's sampling.
THINK_FIELD_NAMES = (THINK_FIELD, *(THINK_PREFIX + f.name for f in THINK_SAMPLING_FIELDS))
PAIR_FIELDS = frozenset(
    f.name for f in SCHEMA_FIELDS if isinstance(f.metadata["codec"], IntervalCodec)
)


class ImageRequest(BaseModel):
    """OpenAI's fields of an image request (generation or edit)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="what to draw, or how to change the input image")
    model: str | None = Field(None, description="the served model's id (see /v1/models)")
    n: int = Field(1, ge=1, le=MAX_IMAGES, description="images to draw; image i uses seed + i")
    size: str | None = Field(
        None,
        description="WIDTHxHEIGHT, or auto (generations: 1024x1024; edits: the input's resized "
        "size, also when unset)",
    )
    response_format: str | None = Field(None, description="b64_json, the only one served")
    output_format: Literal["png", "jpeg", "webp"] = Field(
        "png", description="the image's encoding (png: as the service draws it)"
    )
    output_compression: int | None = Field(
        None, ge=0, le=100, description="jpeg and webp quality, 0-100 (default 100)"
    )
    stream: bool = Field(False, description="answer with server-sent events (n must be 1)")
    user: str | None = Field(None, description="accepted and ignored")
    quality: str | None = Field(None, description="accepted and ignored")
    background: str | None = Field(None, description="accepted and ignored (always opaque)")
    moderation: str | None = Field(None, description="accepted and ignored")
    style: str | None = Field(None, description="accepted and ignored")


def _schema_field(f: dataclasses.Field, about: str = "") -> tuple[Any, Any]:
    meta = f.metadata
    bounds = meta["bounds"]
    constraints: dict[str, float] = {}
    if bounds is not None:
        constraints["gt" if bounds.lo_open else "ge"] = bounds.lo
        constraints["lt" if bounds.hi_open else "le"] = bounds.hi
    kind = meta["codec"].json_type()
    return kind | None, Field(None, description=about + meta["help"], **constraints)


THINK_HELP = (
    "the model first writes a plan for the image and draws from it; the plan streams as "
    "*.thinking events and comes back as bagel.thinking"
)


def _with_schema_fields(name: str) -> type[ImageRequest]:
    return create_model(
        name,
        __base__=ImageRequest,
        __doc__=f"{ImageRequest.__doc__} Plus the request schema's fields and think mode's.",
        **{f.name: _schema_field(f) for f in SCHEMA_FIELDS},
        **{THINK_FIELD: (bool | None, Field(None, description=THINK_HELP))},
        **{
            THINK_PREFIX + f.name: _schema_field(f, "think mode's plan: ")
            for f in THINK_SAMPLING_FIELDS
        },
    )


ImageGenerationRequest = _with_schema_fields("ImageGenerationRequest")
ImageEditRequest = _with_schema_fields("ImageEditRequest")


def schema_values(body: ImageRequest) -> dict[str, Any]:
    """The schema and think fields the body sets, as `client.request.build_request` takes
    them."""
    values = {name: getattr(body, name) for name in (*SCHEMA_FIELD_NAMES, *THINK_FIELD_NAMES)}
    return {name: value for name, value in values.items() if value is not None}


def form_value(name: str, values: list[str]) -> Any:
    """A multipart form field as its JSON counterpart: a pair field (cfg_interval) comes as
    `lo,hi`, a JSON list, or twice (`cfg_interval[]`, as the SDK sends a list); anything else as
    the one string, which pydantic converts."""
    if name not in PAIR_FIELDS:
        return values[0] if len(values) == 1 else values
    if len(values) > 1:
        return values
    text = values[0].strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return [part.strip() for part in text.split(",")]
