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
