"""How an input image of this task reaches the model, on both sides: the prefill service's
resize rules for it (the flags below), and the same preparation of a training batch.

The reference's rules would blow a 128x128 input up to 512x512 (shortest side at least 512), a
size this model never saw; these keep the VAE at the native 128x128 (8x8 latent tokens) and give
the ViT 112x112 (8x8 patches of 14 px).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from bagel.prompting.contexts import EditResize
from bagel.prompting.image_transforms import ResizeRule, navit_position_ids
from examples.tiny_shapes.data import IMAGE_SIZE

VIT_SIZE = 112
VIT_PATCH = 14
EDIT_RESIZE = EditResize(
    vae=ResizeRule(max_size=IMAGE_SIZE, min_size=IMAGE_SIZE, stride=16),
    vit=ResizeRule(max_size=VIT_SIZE, min_size=VIT_SIZE, stride=VIT_PATCH),
)
# The prefill service's flags that give EDIT_RESIZE (`prefill_service.__main__.edit_resize`).
PREFILL_EDIT_FLAGS: tuple[str, ...] = (
    "--edit-vae-resize",
    f"{IMAGE_SIZE},{IMAGE_SIZE}",
    "--edit-vit-resize",
    f"{VIT_SIZE},{VIT_SIZE}",
)


def as_8_bit(images: Tensor) -> Tensor:
    """Images in [-1, 1] rounded to the 256 levels a PNG holds, as an input image arrives."""
    return torch.round((images.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


def vit_pixels(images: Tensor) -> Tensor:
    """`[B, 3, 128, 128]` -> `[B, 3, 112, 112]`: the prefill's bicubic resize of the 8-bit image
    (PIL's bicubic is what antialiased bicubic interpolation mimics), rounded to 8 bits again."""
    resized = F.interpolate(
        as_8_bit(images), size=(VIT_SIZE, VIT_SIZE), mode="bicubic", antialias=True
    )
    return as_8_bit(resized)


def vit_patches(images: Tensor) -> tuple[Tensor, Tensor]:
    """`bagel.prompting.image_transforms.patchify_vit` over a batch `[B, C, H, W]`: patches
    `[B, N, p*p*C]` in (p, q, c) order, and the position ids `[N]` they share."""
    b, c, h, w = images.shape
    rows, cols = h // VIT_PATCH, w // VIT_PATCH
    patches = images.reshape(b, c, rows, VIT_PATCH, cols, VIT_PATCH).permute(0, 2, 4, 3, 5, 1)
    ids = navit_position_ids(rows, cols).to(images.device)
    return patches.reshape(b, rows * cols, -1), ids
