"""The synthetic task: one shape (circle, square, triangle) in one of six colours on a white or
black background, with a caption from a few templates.

Everything random is drawn from one seeded CPU generator and only the rendering runs on the target
device, so a seed gives the same images on a CPU and on a GPU (up to float rounding). Rendering is
a signed distance per pixel turned into one pixel of anti-aliased coverage, for a whole batch at
once: thousands of images per second on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

IMAGE_SIZE = 128
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0)}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)

# Captions that name the background, and captions that leave it open (then either is right).
TEMPLATES_WITH_BACKGROUND: tuple[str, ...] = (
    "a {colour} {shape} on a {background} background",
    "a {colour} {shape}, {background} background",
    "{colour} {shape} on {background}",
)
TEMPLATES_WITHOUT_BACKGROUND: tuple[str, ...] = ("{colour} {shape}", "a {colour} {shape}")
P_NO_BACKGROUND = 0.2

# Size is the circle's radius, the square's half side, the triangle's circumradius; every shape
# stays MARGIN pixels inside the border, which is what `check` reads as the background.
MIN_SIZE, MAX_SIZE = 16.0, 40.0
MARGIN = 8.0


def caption(colour: str, shape: str, background: str | None, template: int = 0) -> str:
    """The caption of one image; `background=None` picks a template that does not name it."""
    if background is None:
        text = TEMPLATES_WITHOUT_BACKGROUND[template % len(TEMPLATES_WITHOUT_BACKGROUND)]
    else:
        text = TEMPLATES_WITH_BACKGROUND[template % len(TEMPLATES_WITH_BACKGROUND)]
    return text.format(colour=colour, shape=shape, background=background)


@dataclass
class ShapeBatch:
    images: Tensor  # [B, 3, H, W] in [-1, 1], float32
    colours: Tensor  # [B] int64, index into COLOUR_NAMES
    shapes: Tensor  # [B] index into SHAPES
    backgrounds: Tensor  # [B] index into BACKGROUND_NAMES
    captions: list[str]


def _signed_distance(shape: Tensor, dx: Tensor, dy: Tensor, size: Tensor) -> Tensor:
    """Per pixel, the distance (in pixels) outside the shape's edge; negative inside. `dx`, `dy`
    are `[B, H, W]` offsets from the centre (y grows downwards), `shape` and `size` `[B, 1, 1]`."""
    circle = torch.sqrt(dx * dx + dy * dy) - size
    square = torch.maximum(dx.abs(), dy.abs()) - size
    # Upright equilateral triangle, centroid at the centre: the largest of its three edges'
    # outward distances, each edge at the inradius size/2.
    c, s = math.sqrt(3) / 2, 0.5
    triangle = torch.maximum(torch.maximum(dy, c * dx - s * dy), -c * dx - s * dy) - size / 2
    return torch.where(shape == 0, circle, torch.where(shape == 1, square, triangle))


def render(
    colours: Tensor,
    shapes: Tensor,
    backgrounds: Tensor,
    centres: Tensor,
    sizes: Tensor,
    image_size: int = IMAGE_SIZE,
) -> Tensor:
    """Images `[B, 3, H, W]` in [-1, 1] on the device of `centres` (`[B, 2]` as x, y pixels)."""
    device = centres.device
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32, device=device) / 127.5 - 1
    grounds = torch.tensor(list(BACKGROUNDS.values()), dtype=torch.float32, device=device)
    grounds = grounds / 127.5 - 1
    axis = torch.arange(image_size, dtype=torch.float32, device=device) + 0.5
    dx = axis[None, None, :] - centres[:, 0, None, None]
    dy = axis[None, :, None] - centres[:, 1, None, None]
    distance = _signed_distance(
        shapes.to(device)[:, None, None], dx, dy, sizes.to(device)[:, None, None]
    )
    coverage = (0.5 - distance).clamp(0.0, 1.0)[:, None]  # one pixel of anti-aliasing
    fg = palette[colours.to(device)][:, :, None, None]
    bg = grounds[backgrounds.to(device)][:, :, None, None]
    return bg + (fg - bg) * coverage


class ShapeGenerator:
    """Seeded batches of shape images and captions: the same seed gives the same batches."""

    def __init__(self, seed: int, device: str | torch.device = "cpu") -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.device = torch.device(device)

    def _uniform(self, n: int, lo: Tensor | float, hi: Tensor | float) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=self.generator)

    def batch(self, n: int) -> ShapeBatch:
        g = self.generator
        colours = torch.randint(len(COLOURS), (n,), generator=g)
        shapes = torch.randint(len(SHAPES), (n,), generator=g)
        backgrounds = torch.randint(len(BACKGROUNDS), (n,), generator=g)
        sizes = self._uniform(n, MIN_SIZE, MAX_SIZE)
        low, high = MARGIN + sizes, IMAGE_SIZE - MARGIN - sizes
        centres = torch.stack([self._uniform(n, low, high), self._uniform(n, low, high)], dim=1)
        named = torch.rand(n, generator=g) >= P_NO_BACKGROUND
        templates = torch.randint(6, (n,), generator=g)
        captions = [
            caption(
                COLOUR_NAMES[c],
                SHAPES[s],
                BACKGROUND_NAMES[b] if keep else None,
                template,
            )
            for c, s, b, keep, template in zip(
                colours.tolist(),
                shapes.tolist(),
                backgrounds.tolist(),
                named.tolist(),
                templates.tolist(),
                strict=True,
            )
        ]
        images = render(colours, shapes, backgrounds, centres.to(self.device), sizes)
        return ShapeBatch(images, colours, shapes, backgrounds, captions)


# ---- edit pairs: one attribute of an image changed, everything else (position, size) kept -----

EDIT_KINDS: tuple[str, ...] = ("colour", "shape", "background")
# `{shape}` is the source's shape, `{value}` the new colour, shape or background.
EDIT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": (
        "make the {shape} {value}",
        "make it {value}",
        "turn the {shape} {value}",
        "change the colour to {value}",
    ),
    "shape": (
        "make it a {value}",
        "turn the {shape} into a {value}",
        "change the {shape} to a {value}",
    ),
    "background": (
        "make the background {value}",
        "change the background to {value}",
        "put it on a {value} background",
    ),
}
_EDIT_VALUES: dict[str, tuple[str, ...]] = {
    "colour": COLOUR_NAMES,
    "shape": SHAPES,
    "background": BACKGROUND_NAMES,
}


@dataclass(frozen=True)
class Edit:
    """Change one attribute (`kind`: colour, shape or background) to `value`."""

    kind: str
    value: str

    def __post_init__(self) -> None:
        if self.kind not in EDIT_KINDS:
            raise ValueError(f"edit kind {self.kind!r}: one of {EDIT_KINDS}")
        if self.value not in _EDIT_VALUES[self.kind]:
            raise ValueError(f"{self.kind} {self.value!r}: one of {_EDIT_VALUES[self.kind]}")

    def instruction(self, source_shape: str, template: int = 0) -> str:
        templates = EDIT_TEMPLATES[self.kind]
        return templates[template % len(templates)].format(shape=source_shape, value=self.value)


def parse_instruction(text: str, source_shape: str) -> Edit | None:
    """The edit an instruction asks of an image showing `source_shape`, if it is one of the
    templates (as the generator writes them), else None."""
    for kind in EDIT_KINDS:
        for value in _EDIT_VALUES[kind]:
            edit = Edit(kind, value)
            for template in range(len(EDIT_TEMPLATES[kind])):
                if edit.instruction(source_shape, template) == text.strip():
                    return edit
    return None


@dataclass
class EditBatch:
    sources: Tensor  # [B, 3, H, W] in [-1, 1]
    targets: Tensor  # [B, 3, H, W]: the same shape, place and size, one attribute changed
    instructions: list[str]
    target_captions: list[str]  # what a caption of the target says (for text-to-image samples)


class EditPairGenerator(ShapeGenerator):
    """Seeded batches of (source, instruction, target): each edit changes the colour, the shape or
    the background to a different one, chosen uniformly."""

    def edit_batch(self, n: int) -> EditBatch:
        g = self.generator
        attributes = torch.stack(
            [
                torch.randint(len(COLOURS), (n,), generator=g),
                torch.randint(len(SHAPES), (n,), generator=g),
                torch.randint(len(BACKGROUNDS), (n,), generator=g),
            ]
        )
        sizes = self._uniform(n, MIN_SIZE, MAX_SIZE)
        low, high = MARGIN + sizes, IMAGE_SIZE - MARGIN - sizes
        centres = torch.stack([self._uniform(n, low, high), self._uniform(n, low, high)], dim=1)
        kinds = torch.randint(len(EDIT_KINDS), (n,), generator=g)
        counts = torch.tensor([len(COLOURS), len(SHAPES), len(BACKGROUNDS)])[kinds]
        # A uniform offset in 1..count-1 makes the new value differ from the old one.
        offsets = 1 + (torch.rand(n, generator=g) * (counts - 1)).long()
        templates = torch.randint(12, (n,), generator=g)
        caption_templates = torch.randint(6, (n,), generator=g)
        named = torch.rand(n, generator=g) >= P_NO_BACKGROUND
        edited = attributes.clone()
        rows = torch.arange(n)
        edited[kinds, rows] = (attributes[kinds, rows] + offsets) % counts

        names = (COLOUR_NAMES, SHAPES, BACKGROUND_NAMES)
        instructions, target_captions = [], []
        for b in range(n):
            kind = int(kinds[b])
            edit = Edit(EDIT_KINDS[kind], names[kind][int(edited[kind, b])])
            instructions.append(edit.instruction(SHAPES[int(attributes[1, b])], int(templates[b])))
            c, s, ground = (int(v) for v in edited[:, b])
            background = BACKGROUND_NAMES[ground] if bool(named[b]) else None
            target_captions.append(
                caption(COLOUR_NAMES[c], SHAPES[s], background, int(caption_templates[b]))
            )
        centres = centres.to(self.device)
        sources = render(attributes[0], attributes[1], attributes[2], centres, sizes)
        targets = render(edited[0], edited[1], edited[2], centres, sizes)
        return EditBatch(sources, targets, instructions, target_captions)
