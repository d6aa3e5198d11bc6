"""Generation parameters and their validation: the one place that says what a valid request is."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bagel.config import BagelConfig

RENORM_TYPES = ("global", "channel", "text_channel")


class InvalidParams(ValueError):
    """A generation parameter is out of range; the message names the field."""


@dataclass(frozen=True)
class GenerationParams:
    """Defaults are BAGEL's app text-to-image settings (cfg 4.0 / 1.5, shift 3, 50 timesteps)."""

    height: int = 1024
    width: int = 1024
    num_timesteps: int = 50
    timestep_shift: float = 3.0
    cfg_text_scale: float = 4.0
    cfg_img_scale: float = 1.5
    cfg_interval: tuple[float, float] = field(default=(0.4, 1.0))
    cfg_renorm_type: str = "global"
    cfg_renorm_min: float = 0.0
    seed: int = 0

    def latent_grid(self, config: BagelConfig) -> tuple[int, int]:
        """(rows, cols) of latent tokens."""
        return self.height // config.pixels_per_token, self.width // config.pixels_per_token

    def validate(self, config: BagelConfig) -> None:
        step = config.pixels_per_token
        limit = config.max_image_size
        for name in ("height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0 or value % step or value > limit:
                raise InvalidParams(
                    f"{name}={value!r} must be a positive multiple of {step} and at most {limit}"
                )
        if not 2 <= self.num_timesteps <= 1000:
            raise InvalidParams(f"num_timesteps={self.num_timesteps} must be in [2, 1000]")
        shift = self.timestep_shift
        if not (math.isfinite(shift) and 0.0 < shift <= 100.0):
            raise InvalidParams(f"timestep_shift={shift!r} must be finite and in (0, 100]")
        for name, upper in (
            ("cfg_text_scale", 100.0),
            ("cfg_img_scale", 100.0),
            ("cfg_renorm_min", 1.0),
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value <= upper):
                raise InvalidParams(f"{name}={value!r} must be finite and in [0, {upper:g}]")
        lo, hi = self.cfg_interval
        if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo <= hi <= 1.0):
            raise InvalidParams(
                f"cfg_interval={self.cfg_interval!r} must satisfy 0 <= lo <= hi <= 1"
            )
        if self.cfg_renorm_type not in RENORM_TYPES:
            raise InvalidParams(
                f"cfg_renorm_type={self.cfg_renorm_type!r} must be one of {', '.join(RENORM_TYPES)}"
            )
        if not 0 <= self.seed < 2**63:
            raise InvalidParams(f"seed={self.seed} must be in [0, 2**63)")
