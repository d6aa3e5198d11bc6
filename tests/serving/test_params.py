"""The request schema: validation names the faulty field."""

from __future__ import annotations

import pytest

from bagel.config import BAGEL_7B
from serving.errors import InvalidParams
from serving.params import GenerationParams


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("height", 1000, "height=1000 must be a positive multiple of 16"),
        ("width", 2048, "width=2048 must be a positive multiple of 16 and at most 1024"),
        ("num_timesteps", 1, "num_timesteps=1"),
        ("timestep_shift", 0.0, "timestep_shift"),
        ("cfg_text_scale", float("nan"), "cfg_text_scale"),
        ("cfg_interval", (0.8, 0.2), "cfg_interval"),
        (
            "cfg_renorm_type",
            "max",
            "cfg_renorm_type='max' must be one of global, channel, text_channel",
        ),
        ("cfg_renorm_min", 1.5, "cfg_renorm_min"),
        ("seed", -1, "seed=-1"),
    ],
)
def test_invalid_params_name_the_field(field, value, message):
    with pytest.raises(InvalidParams, match=message.replace("(", r"\(").replace("[", r"\[")):
        GenerationParams(**{field: value}).validate(
            BAGEL_7B.pixels_per_token, BAGEL_7B.max_image_size
        )


def test_default_params_are_valid_for_bagel_7b():
    GenerationParams().validate(BAGEL_7B.pixels_per_token, BAGEL_7B.max_image_size)
    assert BAGEL_7B.latent_grid(1024, 1024) == (64, 64)
