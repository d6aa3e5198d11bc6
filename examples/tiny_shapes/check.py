"""Judge a generated shape image by pixel statistics: is the background the asked one, and is the
shape's mean colour nearest to the asked colour among the six?

The border ring (where the data generator never draws) gives the background colour; the pixels far
from it are the shape. The shape's kind is guessed too, from how much of its bounding box it fills
(square 1, circle pi/4, triangle 1/2), and reported, but a verdict passes on background and colour.

An edit (`check_edit`) is judged against its source: the instruction's attribute must have become
the asked one, the other two must be unchanged, and the shape must still sit where it was.
`python -m examples.tiny_shapes.check SOURCE EDITED "make the circle blue"` judges two image files.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from examples.tiny_shapes.data import (
    BACKGROUNDS,
    COLOUR_NAMES,
    COLOURS,
    SHAPES,
    Edit,
    caption,
    parse_instruction,
    render,
)

BORDER = 4  # pixels of the ring read as background (the generator keeps shapes 8 px inside)
BACKGROUND_TOLERANCE = 64.0  # largest channel difference from pure white or black
SHAPE_DISTANCE = 100.0  # RGB distance from the background that makes a pixel part of the shape
MIN_SHAPE_PIXELS = 64
CENTRE_TOLERANCE = 8.0  # pixels an edited shape's centroid may move from the source's
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


def _ground_and_shape(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The median colour of the border ring, and the mask of the pixels far from it."""
    ring = np.concatenate(
        [
            pixels[:BORDER].reshape(-1, 3),
            pixels[-BORDER:].reshape(-1, 3),
            pixels[:, :BORDER].reshape(-1, 3),
            pixels[:, -BORDER:].reshape(-1, 3),
        ]
    )
    ground = np.median(ring, axis=0)
    return ground, np.linalg.norm(pixels - ground, axis=-1) > SHAPE_DISTANCE


def check_image(
    image: Image.Image | np.ndarray,
    colour: str,
    background: str | None,
    shape: str | None = None,
) -> Verdict:
    """`background=None` (a caption that names none) accepts white and black alike."""
    pixels = _as_array(image)
    ground, far = _ground_and_shape(pixels)
    nearest_ground = _nearest(ground, BACKGROUNDS)
    close = np.abs(ground - np.array(BACKGROUNDS[nearest_ground])).max() <= BACKGROUND_TOLERANCE
    found_ground = nearest_ground if close else None
    background_ok = found_ground is not None and background in (None, found_ground)

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


# ---- edits -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeSpec:
    """What one shape image shows, and where (`centre`: x, y in pixels, the shape's centroid)."""

    colour: str
    shape: str
    background: str
    centre: tuple[float, float]

    def edited(self, edit: Edit) -> ShapeSpec:
        return replace(self, **{edit.kind: edit.value})


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    rows, cols = np.nonzero(mask)
    return float(cols.mean()) + 0.5, float(rows.mean()) + 0.5


def describe(image: Image.Image | np.ndarray) -> ShapeSpec | None:
    """What an image shows, read from its pixels as `check_image` reads them; None when the
    border is neither white nor black or there is no shape."""
    pixels = _as_array(image)
    ground, far = _ground_and_shape(pixels)
    background = _nearest(ground, BACKGROUNDS)
    if np.abs(ground - np.array(BACKGROUNDS[background])).max() > BACKGROUND_TOLERANCE:
        return None
    if far.sum() < MIN_SHAPE_PIXELS:
        return None
    return ShapeSpec(
        colour=_nearest(pixels[far].mean(axis=0), COLOURS),
        shape=_shape_of(far),
        background=background,
        centre=_centroid(far),
    )


@dataclass(frozen=True)
class EditVerdict:
    expected: ShapeSpec  # the source with the edit applied
    found: Verdict  # the edited image against `expected`'s colour, background and shape
    centre: tuple[float, float] | None
    centre_ok: bool

    @property
    def passed(self) -> bool:
        f = self.found
        return f.background_ok and f.colour_ok and f.shape_ok and self.centre_ok


def check_edit(image: Image.Image | np.ndarray, instruction: str, source: ShapeSpec) -> EditVerdict:
    """Whether `image` is `source` edited as `instruction` says: the named attribute changed to
    the asked value, the other two kept, the centroid within `CENTRE_TOLERANCE` pixels.
    Raises ValueError for an instruction that none of the generator's templates writes."""
    edit = parse_instruction(instruction, source.shape)
    if edit is None:
        raise ValueError(f"not an edit instruction of the tiny shapes task: {instruction!r}")
    expected = source.edited(edit)
    pixels = _as_array(image)
    found = check_image(pixels, expected.colour, expected.background, expected.shape)
    _, far = _ground_and_shape(pixels)
    centre = _centroid(far) if far.sum() >= MIN_SHAPE_PIXELS else None
    centre_ok = centre is not None and bool(
        np.hypot(centre[0] - source.centre[0], centre[1] - source.centre[1]) <= CENTRE_TOLERANCE
    )
    return EditVerdict(expected=expected, found=found, centre=centre, centre_ok=centre_ok)


@dataclass(frozen=True)
class EditEvalPrompt:
    """A rendered source image and an instruction; `seed` is the edit's noise seed."""

    source: ShapeSpec
    size: float  # radius, half side or circumradius, as `data.render` takes it
    edit: Edit
    template: int = 0
    seed: int = 0

    @property
    def text(self) -> str:
        return self.edit.instruction(self.source.shape, self.template)

    def source_image(self) -> Image.Image:
        import torch

        s = self.source
        pixels = render(
            torch.tensor([COLOUR_NAMES.index(s.colour)]),
            torch.tensor([SHAPES.index(s.shape)]),
            torch.tensor([list(BACKGROUNDS).index(s.background)]),
            torch.tensor([s.centre], dtype=torch.float32),
            torch.tensor([self.size]),
        )[0]
        array = ((pixels.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        return Image.fromarray(array)


def _spec(colour: str, shape: str, background: str, x: float, y: float) -> ShapeSpec:
    return ShapeSpec(colour, shape, background, (x, y))


# Four of each kind; every colour, shape and background among the sources and the targets, the
# shapes in different places and sizes, several templates of each kind.
EDIT_EVAL_PROMPTS: tuple[EditEvalPrompt, ...] = (
    EditEvalPrompt(_spec("red", "circle", "white", 64, 64), 30, Edit("colour", "blue"), 0, 21),
    EditEvalPrompt(_spec("green", "square", "black", 44, 80), 22, Edit("colour", "magenta"), 1, 22),
    EditEvalPrompt(_spec("yellow", "triangle", "white", 80, 52), 34, Edit("colour", "cyan"), 2, 23),
    EditEvalPrompt(_spec("cyan", "circle", "black", 88, 86), 20, Edit("colour", "red"), 3, 24),
    EditEvalPrompt(_spec("blue", "circle", "white", 60, 70), 28, Edit("shape", "square"), 0, 25),
    EditEvalPrompt(
        _spec("magenta", "square", "black", 76, 60), 26, Edit("shape", "triangle"), 1, 26
    ),
    EditEvalPrompt(_spec("red", "triangle", "black", 56, 50), 32, Edit("shape", "circle"), 2, 27),
    EditEvalPrompt(_spec("green", "circle", "white", 84, 40), 18, Edit("shape", "triangle"), 0, 28),
    EditEvalPrompt(
        _spec("blue", "square", "white", 64, 64), 24, Edit("background", "black"), 0, 29
    ),
    EditEvalPrompt(
        _spec("yellow", "circle", "black", 48, 84), 26, Edit("background", "white"), 1, 30
    ),
    EditEvalPrompt(
        _spec("magenta", "triangle", "white", 70, 74), 30, Edit("background", "black"), 2, 31
    ),
    EditEvalPrompt(
        _spec("cyan", "square", "black", 82, 46), 20, Edit("background", "white"), 0, 32
    ),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.tiny_shapes.check",
        description="Judge an edit of a tiny shapes image by its pixels (exit 1 when wrong).",
    )
    parser.add_argument("source", help="the input image of the edit")
    parser.add_argument("edited", help="the edited image")
    parser.add_argument("instruction", help='the edit instruction, e.g. "make the circle blue"')
    args = parser.parse_args(argv)
    source = describe(Image.open(args.source))
    if source is None:
        print(f"{args.source}: no shape on a white or black background", file=sys.stderr)
        return 1
    try:
        verdict = check_edit(Image.open(args.edited), args.instruction, source)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    found, want = verdict.found, verdict.expected
    print(
        f"{'pass' if verdict.passed else 'FAIL'}: {args.edited} shows a {found.colour} "
        f"{found.shape} on {found.background} (asked: a {want.colour} {want.shape} on "
        f"{want.background}), centroid {'kept' if verdict.centre_ok else 'moved'}"
    )
    return 0 if verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())
