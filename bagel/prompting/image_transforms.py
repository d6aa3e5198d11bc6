"""Input-image preparation for image editing, following BAGEL's reference transforms: the resize
rule (one per path: VAE and ViT), the conversion to a normalised tensor, and the ViT's patches
with their NaViT position ids.

The reference resizes an edit input with the VAE rule first, then hands that resized image to
both paths; the ViT rule then resizes it again (`edit_inputs` does the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor


@dataclass(frozen=True)
class ResizeRule:
    """Longest side at most `max_size`, shortest at least `min_size`, both sides multiples of
    `stride`, and at most `max_pixels` pixels (the reference's default budget, 14*14*9*1024)."""

    max_size: int
    min_size: int
    stride: int
    max_pixels: int = 14 * 14 * 9 * 1024


VAE_RESIZE = ResizeRule(max_size=1024, min_size=512, stride=16)
VIT_RESIZE = ResizeRule(max_size=980, min_size=224, stride=14)
VIT_PATCH_SIZE = 14
VIT_MAX_PATCHES_PER_SIDE = 70


def _scaled(width: int, height: int, scale: float, stride: int) -> tuple[int, int]:
    # Python's round (half to even) on purpose: it is what the reference uses.
    def side(value: int) -> int:
        return max(stride, int(round(round(value * scale) / stride) * stride))

    return side(width), side(height)


def resized_size(width: int, height: int, rule: ResizeRule) -> tuple[int, int]:
    """The reference's `(width, height)` after resizing: scale the longest side down to
    `max_size` (never up), then up until the shortest side reaches `min_size`, round each side to
    the stride; then shrink again if over the pixel budget or (after rounding) over `max_size`.
    A very elongated image can end with its shortest side below `min_size`: the max wins."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    scale = min(rule.max_size / max(width, height), 1.0)
    scale = max(scale, rule.min_size / min(width, height))
    width, height = _scaled(width, height, scale, rule.stride)
    if width * height > rule.max_pixels:
        width, height = _scaled(width, height, rule.max_pixels / (width * height), rule.stride)
    if max(width, height) > rule.max_size:
        width, height = _scaled(width, height, rule.max_size / max(width, height), rule.stride)
    return width, height


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (as the reference does)."""
    if image.mode == "RGBA" or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.split()[3])
        return white
    return image.convert("RGB")


def resize(image: Image.Image, rule: ResizeRule) -> Image.Image:
    """Bicubic resize to `resized_size` (torchvision's resize of a PIL image is PIL's bicubic)."""
    size = resized_size(*image.size, rule)
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


def to_tensor(image: Image.Image) -> Tensor:
    """`[3, H, W]` float32 in [-1, 1]: pixels / 255, then mean 0.5 and std 0.5 per channel (both
    paths use these values: the VAE's [-1, 1] range and SigLIP's normalisation coincide)."""
    pixels = torch.from_numpy(np.asarray(to_rgb(image), dtype=np.uint8).copy())
    return (pixels.permute(2, 0, 1).float() / 255.0 - 0.5) / 0.5


def vae_image(image: Image.Image) -> Tensor:
    return to_tensor(resize(to_rgb(image), VAE_RESIZE))


def vit_image(image: Image.Image) -> Tensor:
    return to_tensor(resize(to_rgb(image), VIT_RESIZE))


def edit_inputs(image: Image.Image) -> tuple[Tensor, Tensor]:
    """(VAE tensor, ViT tensor) of an edit input: the VAE resize first, then each path's own."""
    resized = resize(to_rgb(image), VAE_RESIZE)
    return vae_image(resized), vit_image(resized)


def navit_position_ids(
    rows: int, cols: int, max_per_side: int = VIT_MAX_PATCHES_PER_SIDE
) -> Tensor:
    """Row-major `row * max_per_side + col` ("extrapolate"): a patch keeps its id whatever the
    image size, so a small image reads the top-left corner of the position grid."""
    if rows > max_per_side or cols > max_per_side:
        raise ValueError(f"{rows}x{cols} patches exceed the {max_per_side}x{max_per_side} grid")
    return (torch.arange(rows)[:, None] * max_per_side + torch.arange(cols)).flatten()


def patchify_vit(
    image: Tensor,
    patch_size: int = VIT_PATCH_SIZE,
    max_per_side: int = VIT_MAX_PATCHES_PER_SIDE,
) -> tuple[Tensor, Tensor]:
    """`[C, H, W]` to patches `[N, p*p*C]` (row-major over the grid, features in (p, q, c) order)
    and their position ids `[N]`."""
    c, h, w = image.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image {h}x{w} is not a multiple of the patch size {patch_size}")
    rows, cols = h // patch_size, w // patch_size
    patches = image.reshape(c, rows, patch_size, cols, patch_size).permute(1, 3, 2, 4, 0)
    return patches.reshape(rows * cols, -1), navit_position_ids(rows, cols, max_per_side)
