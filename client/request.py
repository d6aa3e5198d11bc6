"""Keyword arguments -> `GenerateRequest`: the one place the client names the request fields.

Only what a caller passes is set, so every unset field keeps the server's default.
"""

from __future__ import annotations

from typing import Any

from protos import CfgInterval, CfgRenormType, GenerateRequest

RENORM_TYPES = {
    "global": CfgRenormType.CFG_RENORM_TYPE_GLOBAL,
    "channel": CfgRenormType.CFG_RENORM_TYPE_CHANNEL,
    "text_channel": CfgRenormType.CFG_RENORM_TYPE_TEXT_CHANNEL,
}
_INT_FIELDS = ("height", "width", "num_timesteps", "seed")
_FLOAT_FIELDS = ("timestep_shift", "cfg_text_scale", "cfg_img_scale", "cfg_renorm_min")
PARAM_NAMES = frozenset(
    (
        *_INT_FIELDS,
        *_FLOAT_FIELDS,
        "steps",
        "cfg_interval",
        "cfg_renorm_type",
        "negative_prompt",
        "request_id",
    )
)


def build_request(prompt: str, **params: Any) -> GenerateRequest:
    """A request for `prompt`; `params` are the names in `PARAM_NAMES` (`steps` is an alias of
    `num_timesteps`). A value of None leaves the field unset. Unknown names raise TypeError, values
    of the wrong type or out of the wire's range raise TypeError or ValueError."""
    unknown = sorted(set(params) - PARAM_NAMES)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")
    if params.get("steps") is not None:
        if params.get("num_timesteps") is not None:
            raise TypeError("pass num_timesteps or its alias steps, not both")
        params["num_timesteps"] = params["steps"]
    values = {k: v for k, v in params.items() if v is not None and k != "steps"}

    request = GenerateRequest(prompt=prompt)
    p = request.params
    for name in _INT_FIELDS:
        if name in values:
            value = values[name]
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
            setattr(p, name, value)
    for name in _FLOAT_FIELDS:
        if name in values:
            setattr(p, name, _as_float(name, values[name]))
    if "cfg_interval" in values:
        interval = values["cfg_interval"]
        if not isinstance(interval, tuple | list) or len(interval) != 2:
            raise TypeError(f"cfg_interval must be a pair (lo, hi), got {interval!r}")
        lo, hi = (_as_float("cfg_interval", x) for x in interval)
        p.cfg_interval.CopyFrom(CfgInterval(lo=lo, hi=hi))
    if "cfg_renorm_type" in values:
        name = values["cfg_renorm_type"]
        if name not in RENORM_TYPES:
            raise ValueError(
                f"cfg_renorm_type must be one of {', '.join(RENORM_TYPES)}, got {name!r}"
            )
        p.cfg_renorm_type = RENORM_TYPES[name]
    if "negative_prompt" in values:
        p.negative_prompt = _as_str("negative_prompt", values["negative_prompt"])
    if "request_id" in values:
        request.request_id = _as_str("request_id", values["request_id"])
    return request


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {value!r}")
    return float(value)


def _as_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {value!r}")
    return value
