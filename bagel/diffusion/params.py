"""What the model reads of a request. The request schema itself (`serving.params`) lives outside
the model; any object with these attributes will do, so the model never imports it."""

from __future__ import annotations

from typing import Protocol


class SamplingParams(Protocol):
    """The sampler's view of a request: schedule, guidance and seed."""

    num_timesteps: int
    timestep_shift: float
    cfg_text_scale: float
    cfg_img_scale: float
    cfg_interval: tuple[float, float]
    cfg_renorm_type: str  # "global", "channel" or "text_channel"
    cfg_renorm_min: float
    seed: int


class ImageParams(SamplingParams, Protocol):
    """A whole text-to-image request as the in-process pipeline runs it."""

    height: int
    width: int
    negative_prompt: str
