"""Keyword arguments -> `GenerateRequest`, derived from the request schema
(`serving.params.GenerationParams`): every field of the schema is a keyword argument of the same
name, plus `steps` (alias of `num_timesteps`) and `request_id`.

Only what a caller passes is set, so every unset field keeps the server's default.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from protos import GenerateRequest
from serving.params import GenerationParams

_FIELDS = {f.name: f for f in dataclasses.fields(GenerationParams)}
ALIASES = {"steps": "num_timesteps"}
PARAM_NAMES = frozenset((*_FIELDS, *ALIASES, "request_id"))


def build_request(prompt: str, **params: Any) -> GenerateRequest:
    """A request for `prompt`; `params` are the names in `PARAM_NAMES`. A value of None leaves
    the field unset. Unknown names raise TypeError, values of the wrong type or out of the wire's
    range raise TypeError or ValueError."""
    unknown = sorted(set(params) - PARAM_NAMES)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")
    for alias, name in ALIASES.items():
        if params.get(alias) is not None:
            if params.get(name) is not None:
                raise TypeError(f"pass {name} or its alias {alias}, not both")
            params[name] = params[alias]
    request = GenerateRequest(prompt=prompt)
    request_id = params.get("request_id")
    if request_id is not None:
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str, got {request_id!r}")
        request.request_id = request_id
    for name, f in _FIELDS.items():
        value = params.get(name)
        if value is None:
            continue
        codec = f.metadata["codec"]
        codec.to_proto(request.params, name, codec.from_user(name, value))
    return request
