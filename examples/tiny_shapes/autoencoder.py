"""Training the FLUX-layout autoencoder, and giving its latents unit scale inside its own weights.

The loss is L1 + L2 reconstruction of a sample from the posterior, plus a small KL to N(0, 1).
BAGEL's `encode`/`decode` apply FLUX's fixed `scale_factor` and `shift_factor`, which the
published format does not store, so after training a per-channel scale is folded into the
encoder's output and the decoder's input convolution: `encode` then gives latents of unit standard
deviation per channel, the space the flow model is trained and sampled in.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bagel.network.autoencoder import AutoEncoder

KL_WEIGHT = 1e-4


def autoencoder_loss(
    ae: AutoEncoder, images: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss, its parts, detached) for images `[B, 3, H, W]` in [-1, 1]."""
    moments = ae.encoder(images)
    mean, logvar = moments.chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    z = mean + torch.exp(0.5 * logvar) * noise
    recon = ae.decoder(z)
    l1 = (recon - images).abs().mean()
    l2 = (recon - images).pow(2).mean()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    loss = l1 + l2 + KL_WEIGHT * kl
    return loss, {"l1": l1.detach(), "l2": l2.detach(), "kl": kl.detach()}


@torch.no_grad()
def fold_unit_scale(ae: AutoEncoder, images: Tensor) -> Tensor:
    """Scale each latent channel so that `ae.encode(images)` has unit standard deviation; returns
    the per-channel factors. Only a scale (no shift) is folded: the decoder's first convolution
    pads with zeros, so a shift would not fold exactly at the border, and a scale does."""
    z = ae.encode(images.float())  # S * (mean - F), S and F FLUX's constants
    params = ae.params
    raw_std = (z / params.scale_factor).std(dim=(0, 2, 3))  # the std of the posterior mean
    factor = 1.0 / (params.scale_factor * raw_std)
    channels = params.z_channels
    conv_out = ae.encoder.conv_out
    conv_out.weight[:channels] *= factor[:, None, None, None]
    conv_out.bias[:channels] *= factor
    conv_out.bias[channels:] += 2.0 * torch.log(factor)  # the log-variance moves with the mean
    ae.decoder.conv_in.weight /= factor[None, :, None, None]
    return factor
