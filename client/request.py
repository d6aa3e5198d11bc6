"""Keyword arguments -> `GenerateRequest`, derived from the request schema
(`serving.params.GenerationParams`): every field of the schema is a keyword argument of the same
name, plus `steps` (alias of `num_timesteps`), `request_id`, and `think` with its sampling settings
(`think_temperature`, ... from `serving.text_params.TextSampling`); an edit adds its input
images.

Only what a caller passes is set, so every unset field keeps the server's default. A seed of -1
(what ComfyUI and A1111 users write for "random") is left unset too: the server picks one, and
the result says which.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from protos import GenerateRequest
from serving.params import GenerationParams
from serving.text_params import sampling_message, sampling_names

_FIELDS = {f.name: f for f in dataclasses.fields(GenerationParams)}
ALIASES = {"steps": "num_timesteps"}
SERVER_PICKS_SEED = -1
THINK_PREFIX = "think_"  # think mode's sampling settings: `think_temperature`, ...
THINK_NAMES = sampling_names(THINK_PREFIX)
PARAM_NAMES = frozenset((*_FIELDS, *ALIASES, "request_id", "think", *THINK_NAMES))


def build_request(
    prompt: str, *, input_images: Sequence[bytes] = (), **params: Any
) -> GenerateRequest:
    """A request for `prompt` (an edit of `input_images`, PNG or JPEG bytes, if any); `params`
    are the names in `PARAM_NAMES`. A value of None leaves the field unset. Unknown names raise
    TypeError, values of the wrong type or out of the wire's range raise TypeError or
    ValueError."""
    unknown = sorted(set(params) - PARAM_NAMES)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")
    for alias, name in ALIASES.items():
        if params.get(alias) is not None:
            if params.get(name) is not None:
                raise TypeError(f"pass {name} or its alias {alias}, not both")
            params[name] = params[alias]
    request = GenerateRequest(prompt=prompt, input_images=list(input_images))
    think = params.get("think")
    if think is not None:
        if not isinstance(think, bool):
            raise TypeError(f"think must be a bool, got {think!r}")
        request.think = think
    think_sampling = {n: params[n] for n in THINK_NAMES if params.get(n) is not None}
    if think_sampling:
        request.think_sampling.CopyFrom(sampling_message(THINK_PREFIX, **think_sampling))
    request_id = params.get("request_id")
    if request_id is not None:
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str, got {request_id!r}")
        request.request_id = request_id
    for name, f in _FIELDS.items():
        value = params.get(name)
        if value is None or (name == "seed" and value == SERVER_PICKS_SEED):
            continue
        codec = f.metadata["codec"]
        codec.to_proto(request.params, name, codec.from_user(name, value))
    return request


ImageInput = bytes | str | Path | Image.Image


def image_bytes(image: ImageInput) -> bytes:
    """An input image as the wire carries it: PNG or JPEG bytes are sent as they are, a path is
    read, a PIL image is encoded as PNG. The server checks the bytes."""
    if isinstance(image, bytes):
        return image
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(f"an input image must be bytes, a path or a PIL image, got {type(image)!r}")
