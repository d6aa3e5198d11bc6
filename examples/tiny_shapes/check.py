"""Judge a generated shape image by pixel statistics: is the background the asked one, and is the
shape's mean colour nearest to the asked colour among the six?

The border ring (where the data generator never draws) gives the background colour; the pixels far
from it are the shape. The shape's kind is guessed too, from how much of its bounding box it fills
(square 1, circle pi/4, triangle 1/2), and reported, but a verdict passes on background and colour.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from examples.tiny_shapes.data import BACKGROUNDS, COLOURS, SHAPES, caption

BORDER = 4  # pixels of the ring read as background (the generator keeps shapes 8 px inside)
BACKGROUND_TOLERANCE = 64.0  # largest channel difference from pure white or black
SHAPE_DISTANCE = 100.0  # RGB distance from the background that makes a pixel part of the shape
MIN_SHAPE_PIXELS = 64
# Bounding-box fill between these: triangle below the first, square above the second.
TRIANGLE_BELOW, SQUARE_ABOVE = 0.64, 0.89


@dataclass(frozen=True)
class Verdict:
    background: str | None  # "white", "black", or None when the border is neither
    colour: str | None  # nearest palette colour of the shape, None when no shape was found
    shape: str | None
    background_ok: bool
    colour_ok: bool
    shape_ok: bool

    @property
    def passed(self) -> bool:
        return self.background_ok and self.colour_ok


@dataclass(frozen=True)
class EvalPrompt:
    colour: str
    shape: str
    background: str | None
    template: int = 0
    seed: int = 0

    @property
    def text(self) -> str:
        return caption(self.colour, self.shape, self.background, self.template)


# Every colour twice, every shape four times, both backgrounds six times, two templates.
EVAL_PROMPTS: tuple[EvalPrompt, ...] = (
    EvalPrompt("red", "circle", "white", 0, 1),
    EvalPrompt("green", "square", "black", 0, 2),
    EvalPrompt("blue", "triangle", "white", 1, 3),
    EvalPrompt("yellow", "circle", "black", 1, 4),
    EvalPrompt("magenta", "square", "white", 0, 5),
    EvalPrompt("cyan", "triangle", "black", 0, 6),
    EvalPrompt("blue", "circle", "black", 0, 7),
    EvalPrompt("red", "square", "black", 1, 8),
    EvalPrompt("green", "triangle", "white", 0, 9),
    EvalPrompt("cyan", "circle", "white", 0, 10),
    EvalPrompt("yellow", "square", "white", 0, 11),
    EvalPrompt("magenta", "triangle", "black", 1, 12),
)


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image, dtype=np.float64)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {array.shape}")
    return array


def _nearest(value: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    distances = [np.linalg.norm(value - np.array(palette[n], dtype=np.float64)) for n in names]
    return names[int(np.argmin(distances))]


def _shape_of(mask: np.ndarray) -> str:
    """The shape whose bounding-box fill is nearest; rows and columns with fewer than two shape
    pixels are left out of the box so that stray pixels do not stretch it."""
    rows = np.flatnonzero(mask.sum(axis=1) >= 2)
    cols = np.flatnonzero(mask.sum(axis=0) >= 2)
    if rows.size == 0 or cols.size == 0:
        return SHAPES[0]
    box = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    fill = box.sum() / box.size
    if fill < TRIANGLE_BELOW:
        return "triangle"
    return "circle" if fill < SQUARE_ABOVE else "square"


def check_image(
    image: Image.Image | np.ndarray,
    colour: str,
    background: str | None,
    shape: str | None = None,
) -> Verdict:
    """`background=None` (a caption that names none) accepts white and black alike."""
    pixels = _as_array(image)
    ring = np.concatenate(
        [
            pixels[:BORDER].reshape(-1, 3),
            pixels[-BORDER:].reshape(-1, 3),
            pixels[:, :BORDER].reshape(-1, 3),
            pixels[:, -BORDER:].reshape(-1, 3),
        ]
    )
    ground = np.median(ring, axis=0)
    nearest_ground = _nearest(ground, BACKGROUNDS)
    close = np.abs(ground - np.array(BACKGROUNDS[nearest_ground])).max() <= BACKGROUND_TOLERANCE
    found_ground = nearest_ground if close else None
    background_ok = found_ground is not None and background in (None, found_ground)

    far = np.linalg.norm(pixels - ground, axis=-1) > SHAPE_DISTANCE
    found_colour = found_shape = None
    if far.sum() >= MIN_SHAPE_PIXELS:
        found_colour = _nearest(pixels[far].mean(axis=0), COLOURS)
        found_shape = _shape_of(far)
    return Verdict(
        background=found_ground,
        colour=found_colour,
        shape=found_shape,
        background_ok=background_ok,
        colour_ok=found_colour == colour,
        shape_ok=shape is not None and found_shape == shape,
    )


def check_prompt(image: Image.Image | np.ndarray, prompt: EvalPrompt) -> Verdict:
    return check_image(image, prompt.colour, prompt.background, prompt.shape)
