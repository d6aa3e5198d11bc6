"""The prompt check: right on the data generator's own images, wrong on noise and flat images (and,
in test_tiny_shapes_prompts, on a random checkpoint's images)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from examples.tiny_shapes.check import EVAL_PROMPTS, check_image
from examples.tiny_shapes.data import (
    BACKGROUND_NAMES,
    COLOUR_NAMES,
    SHAPES,
    ShapeGenerator,
    caption,
)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """`[B, 3, H, W]` in [-1, 1] -> `[B, H, W, 3]` uint8, as `bagel.network.autoencoder.to_rgb`
    rounds."""
    pixels = ((images.clamp(-1, 1) * 0.5 + 0.5) * 255.0).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def batch():
    return ShapeGenerator(seed=123).batch(400)


def test_every_generated_image_passes_for_its_own_caption(batch):
    images = to_uint8(batch.images)
    shapes = 0
    for i, image in enumerate(images):
        colour = COLOUR_NAMES[batch.colours[i]]
        shape = SHAPES[batch.shapes[i]]
        verdict = check_image(image, colour, BACKGROUND_NAMES[batch.backgrounds[i]], shape)
        assert verdict.passed, (i, batch.captions[i], verdict)
        shapes += verdict.shape_ok
    assert shapes >= 0.97 * len(images)


def test_a_generated_image_fails_for_another_colour_or_background(batch):
    images = to_uint8(batch.images[:60])
    for i, image in enumerate(images):
        colour = COLOUR_NAMES[batch.colours[i]]
        other_colour = COLOUR_NAMES[(batch.colours[i] + 1) % len(COLOUR_NAMES)]
        other_ground = BACKGROUND_NAMES[1 - batch.backgrounds[i]]
        assert not check_image(image, other_colour, None).passed
        assert not check_image(image, colour, other_ground).passed
        assert check_image(image, colour, None).passed  # no background named: either is right


def test_noise_and_flat_images_fail():
    rng = np.random.default_rng(0)
    for colour in COLOUR_NAMES:
        noise = rng.integers(0, 256, size=(128, 128, 3))
        assert not check_image(noise, colour, "white").passed
        assert not check_image(noise, colour, None).passed
        for value in (0, 128, 255):  # a background with no shape on it
            assert not check_image(np.full((128, 128, 3), value), colour, None).passed


def test_eval_prompts_cover_every_colour_each_shape_twice_and_both_backgrounds():
    assert len(EVAL_PROMPTS) == 12
    assert set(p.colour for p in EVAL_PROMPTS) == set(COLOUR_NAMES)
    assert min(Counter(p.shape for p in EVAL_PROMPTS).values()) >= 2
    assert set(p.background for p in EVAL_PROMPTS) == set(BACKGROUND_NAMES)
    assert len({p.seed for p in EVAL_PROMPTS}) == 12
    assert (
        EVAL_PROMPTS[0].text
        == caption("red", "circle", "white")
        == ("a red circle on a white background")
    )
