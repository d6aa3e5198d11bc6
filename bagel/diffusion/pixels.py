"""Final latent tokens -> pixels through the VAE decoder, as the services and the in-process
pipeline both decode."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from bagel.diffusion.generation import ForwardGraphs
from bagel.network.autoencoder import AutoEncoder, to_rgb
from bagel.network.config import BagelConfig
from bagel.network.latents import unpatchify


@torch.no_grad()
def decode_pixels(
    autoencoder: AutoEncoder,
    config: BagelConfig,
    latents: Tensor,
    height: int,
    width: int,
    graphs: ForwardGraphs | None = None,
) -> np.ndarray:
    """Final latent tokens `[h*w, patch_dim]` -> the `height x width` image as uint8 RGB pixels
    `[height, width, 3]`, through the VAE decoder. With `graphs`, on a GPU, the decoder runs as
    a capture in the forwards' memory pool (`ForwardGraphs.run_fixed`): at 1024² its activations
    then reuse the memory the forwards' activations hold, rather than sitting beside it."""
    rows, cols = config.latent_grid(height, width)
    z = unpatchify(latents, rows, cols, config.latent_patch_size)
    weight = next(autoencoder.parameters())
    z = z[None].to(weight.device, weight.dtype)
    if graphs is not None and z.is_cuda:
        pixels = graphs.run_fixed(("vae decode", id(autoencoder)), autoencoder.decode, (z,))
    else:
        pixels = autoencoder.decode(z)
    return to_rgb(pixels.float())


def decode_image(
    autoencoder: AutoEncoder,
    config: BagelConfig,
    latents: Tensor,
    height: int,
    width: int,
    graphs: ForwardGraphs | None = None,
) -> Image.Image:
    """`decode_pixels` as an RGB PIL image."""
    return Image.fromarray(decode_pixels(autoencoder, config, latents, height, width, graphs))
