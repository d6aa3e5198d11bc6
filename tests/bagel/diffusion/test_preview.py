"""The previews' pieces: the preview steps, the sampler's clean-image estimate, and the fitted
latent -> RGB map."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bagel.diffusion.preview import fit_latent_rgb
from bagel.diffusion.sampler import denoise, preview_steps, schedule
from bagel.network.latents import patchify
from serving.params import GenerationParams


@pytest.mark.parametrize("total", [1, 2, 3, 7, 49])
@pytest.mark.parametrize("count", [0, 1, 2, 3])
def test_there_are_exactly_as_many_preview_steps_as_asked_all_inside_the_run(total, count):
    steps = preview_steps(total, count)
    assert len(steps) == count
    assert steps == sorted(steps)
    assert all(1 <= s <= total for s in steps)
    if total > count:  # room for distinct steps before the last, which gives the image itself
        assert len(set(steps)) == count and all(s < total for s in steps)


def test_preview_steps_are_evenly_spaced():
    assert preview_steps(49, 3) == [12, 24, 37]
    assert preview_steps(49, 1) == [24]


def test_the_estimate_is_the_clean_image_of_an_exact_flow():
    """A velocity model that knows x0 (`v = (x_t - x0) / t`) makes the estimate x0 at every step;
    the hook sees exactly the asked steps."""
    params = GenerationParams(num_timesteps=9, cfg_text_scale=1.0, seed=3)
    x0 = torch.randn(12, 4, generator=torch.Generator().manual_seed(1))

    def velocity(x, t, branches):
        return {b: (x - x0) / t for b in branches}

    seen = {}
    noise = torch.randn(12, 4, generator=torch.Generator().manual_seed(2))
    denoise(
        noise,
        velocity,
        params,
        on_estimate=lambda step, estimate: seen.setdefault(step, estimate),
        estimate_steps=frozenset({2, 5}),
    )
    assert sorted(seen) == [2, 5]
    for estimate in seen.values():
        torch.testing.assert_close(estimate, x0, rtol=0, atol=1e-5)
    assert len(schedule(params.num_timesteps, params.timestep_shift)[0]) == 8


class PixelLinearEncoder(nn.Module):
    """An autoencoder stand-in whose encoder is affine per pixel, then 8x average pooling: the
    fitted map must invert it exactly on pooled pixels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.mix = nn.Parameter(torch.randn(channels, 3, generator=generator))
        self.offset = nn.Parameter(torch.randn(channels, generator=generator))
        self.params = SimpleNamespace(z_channels=channels)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        z = torch.einsum("cr,brhw->bchw", self.mix, images) + self.offset[None, :, None, None]
        return F.avg_pool2d(z, 8)


def test_the_fitted_map_inverts_an_affine_encoder_exactly():
    encoder = PixelLinearEncoder(channels=6)
    latent_rgb = fit_latent_rgb(encoder)
    generator = torch.Generator().manual_seed(9)
    image = torch.rand(1, 3, 32, 48, generator=generator) * 2 - 1
    with torch.no_grad():
        z = encoder.encode(image)[0]  # [6, 4, 6]
    tokens = patchify(z, 2)
    got = latent_rgb.pixels(tokens, 2, 3, 2).astype(int)
    pooled = F.avg_pool2d(image, 8)[0]
    expected = (torch.clamp(pooled * 0.5 + 0.5, 0, 1) * 255).to(torch.uint8).permute(1, 2, 0)
    assert got.shape == (4, 6, 3)
    assert abs(got - expected.numpy().astype(int)).max() <= 1
