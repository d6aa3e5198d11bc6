"""Between VAE latents `[C, 2h, 2w]` and latent tokens `[h*w, p*p*C]` (feature order (p, q, c),
tokens row-major), as BAGEL packs them, and the rows of the latent position table they read."""

from __future__ import annotations

import torch
from torch import Tensor


def patchify(z: Tensor, patch: int) -> Tensor:
    c, height, width = z.shape
    h, w = height // patch, width // patch
    return z.reshape(c, h, patch, w, patch).permute(1, 3, 2, 4, 0).reshape(h * w, patch * patch * c)


def unpatchify(tokens: Tensor, rows: int, cols: int, patch: int) -> Tensor:
    channels = tokens.shape[-1] // (patch * patch)
    x = tokens.reshape(rows, cols, patch, patch, channels).permute(4, 0, 2, 1, 3)
    return x.reshape(channels, rows * patch, cols * patch)


def latent_position_ids(rows: int, cols: int, max_latent_size: int) -> Tensor:
    """Table rows of a `rows x cols` latent grid, row-major: `row * max_latent_size + col`."""
    r = torch.arange(rows)[:, None]
    c = torch.arange(cols)[None, :]
    return (r * max_latent_size + c).flatten()
