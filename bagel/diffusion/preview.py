"""Cheap previews of an image while it is denoised: the clean-image estimate's latents mapped to
RGB by one fixed affine map per latent pixel (`z_channels` -> 3), at latent resolution (1/8 of the
image's side: 128x128 for a 1024x1024 image). No VAE decode, so a preview costs a gather of the
latents and a small matrix product.

The map is fitted once per autoencoder, by least squares: a few seeded synthetic images (flat
colour blocks over smooth colour fields) go through the real encoder, and their pixels,
average-pooled to latent resolution, are regressed on the latent channels plus a constant. Fitting
on encoded images keeps the latents on the data's manifold, where the decoder is close to linear
per pixel; random latents are not, and a map fitted on them gets colours wrong. The fit is
deterministic for a given autoencoder, so every restart makes the same previews.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bagel.network.autoencoder import AutoEncoder, to_rgb
from bagel.network.latents import unpatchify

FIT_SIZE = 128  # pixels per side of each synthetic image
FIT_SAMPLES = 8
FIT_SEED = 0
BLOCKS_PER_IMAGE = 6


@dataclass(frozen=True)
class LatentRGB:
    """`rgb = weight @ z + bias` per latent pixel, in the decoder's [-1, 1] range."""

    weight: Tensor  # [3, z_channels], fp32
    bias: Tensor  # [3], fp32

    def pixels(self, tokens: Tensor, rows: int, cols: int, patch: int) -> np.ndarray:
        """Latent tokens `[rows*cols, patch*patch*z]` -> uint8 RGB `[rows*patch, cols*patch, 3]`."""
        z = unpatchify(tokens.detach().float().cpu(), rows, cols, patch)
        rgb = torch.einsum("oc,chw->ohw", self.weight, z) + self.bias[:, None, None]
        return to_rgb(rgb)


def synthetic_images(size: int, samples: int, seed: int) -> Tensor:
    """`samples` RGB images `[samples, 3, size, size]` in [-1, 1]: a smooth random colour field
    with a few flat rectangles of random colours on top."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(samples, 3, 4, 4, generator=generator) * 2 - 1
    images = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    for image in images:
        for _ in range(BLOCKS_PER_IMAGE):
            x0, y0 = torch.randint(0, size * 3 // 4, (2,), generator=generator).tolist()
            w, h = torch.randint(size // 8, size // 2, (2,), generator=generator).tolist()
            colour = torch.rand(3, 1, 1, generator=generator) * 2 - 1
            image[:, y0 : y0 + h, x0 : x0 + w] = colour
    return images


@torch.no_grad()
def fit_latent_rgb(
    autoencoder: AutoEncoder,
    *,
    size: int = FIT_SIZE,
    samples: int = FIT_SAMPLES,
    seed: int = FIT_SEED,
) -> LatentRGB:
    """The least-squares affine map from encoded latent channels to the pooled pixels."""
    weight = next(autoencoder.parameters())
    channels = autoencoder.params.z_channels
    images = synthetic_images(size, samples, seed)
    z = autoencoder.encode(images.to(weight.device, weight.dtype)).float().cpu()
    side = z.shape[-1]
    pooled = F.avg_pool2d(images, size // side)  # [samples, 3, side, side]
    inputs = torch.cat([z, torch.ones(samples, 1, side, side)], dim=1)
    design = inputs.permute(0, 2, 3, 1).reshape(-1, channels + 1).double()
    target = pooled.permute(0, 2, 3, 1).reshape(-1, 3).double()
    solution = torch.linalg.lstsq(design, target).solution  # [channels + 1, 3]
    return LatentRGB(
        weight=solution[:channels].T.float().contiguous(), bias=solution[channels].float()
    )
