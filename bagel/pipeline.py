"""The whole text-to-image generation in one process: the reference every other path is
compared against. fp32 on CPU, bf16 on CUDA."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from bagel.autoencoder import AutoEncoder, to_pil
from bagel.checkpoint import load_autoencoder, load_bagel
from bagel.config import BagelConfig
from bagel.generation import BlockVelocity, ForwardGraphs, latent_position_ids
from bagel.latents import unpatchify
from bagel.model import Bagel, ContextKV
from bagel.params import GenerationParams
from bagel.prompts import cfg_prompts
from bagel.sampler import UNCOND_IMG, StepCallback, denoise, initial_noise
from bagel.tokenizer import PromptTokenizer, load_tokenizer


def default_dtype(device: str | torch.device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


@dataclass
class Generated:
    image: Image.Image
    latents: Tensor  # final latent tokens [h*w, patch_dim], fp32


@torch.no_grad()
def decode_image(
    autoencoder: AutoEncoder, config: BagelConfig, latents: Tensor, params: GenerationParams
) -> Image.Image:
    """Final latent tokens `[h*w, patch_dim]` -> the RGB image, through the VAE decoder."""
    rows, cols = params.latent_grid(config)
    z = unpatchify(latents, rows, cols, config.latent_patch_size)
    weight = next(autoencoder.parameters())
    pixels = autoencoder.decode(z[None].to(weight.device, weight.dtype))
    return to_pil(pixels.float())


class Pipeline:
    """Loads a checkpoint directory once; generates images from prompts or from prefilled KV."""

    def __init__(
        self, model_dir: str | Path, device: str = "cpu", dtype: torch.dtype | None = None
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype or default_dtype(device)
        self.config = BagelConfig.from_dir(model_dir)
        self.tokenizer: PromptTokenizer = load_tokenizer(model_dir)
        self.model: Bagel = load_bagel(model_dir, "diffusion", self.dtype, self.device, self.config)
        self.autoencoder: AutoEncoder = load_autoencoder(model_dir, self.dtype, self.device)
        self.graphs = ForwardGraphs() if self.device.type == "cuda" else None

    @property
    def marker_ids(self) -> tuple[int, int]:
        return (self.tokenizer.start_of_image, self.tokenizer.end_of_image)

    def prefill(self, prompt: str, negative_prompt: str = "") -> dict[str, ContextKV]:
        prompts = cfg_prompts(self.tokenizer, prompt, negative_prompt)
        return dict(zip(prompts, self.model.prefill(list(prompts.values())), strict=True))

    def denoise(
        self,
        contexts: Mapping[str, ContextKV],
        params: GenerationParams,
        batch_branches: bool = True,
        on_step: StepCallback | None = None,
    ) -> Tensor:
        params.validate(self.config)
        rows, cols = params.latent_grid(self.config)
        velocity = BlockVelocity(
            self.model,
            contexts,
            latent_position_ids(rows, cols, self.config.max_latent_size),
            self.marker_ids,
            batch_branches=batch_branches,
            graphs=self.graphs,  # only takes effect on a GPU
        )
        x = initial_noise(params, rows * cols, self.config.patch_dim)
        return denoise(x, velocity, params, has_img_context=UNCOND_IMG in contexts, on_step=on_step)

    def decode(self, latents: Tensor, params: GenerationParams) -> Image.Image:
        return decode_image(self.autoencoder, self.config, latents, params)

    def generate(
        self, prompt: str, params: GenerationParams, negative_prompt: str = ""
    ) -> Generated:
        params.validate(self.config)
        latents = self.denoise(self.prefill(prompt, negative_prompt), params)
        return Generated(image=self.decode(latents, params), latents=latents)


def generate(
    model_dir: str | Path, prompt: str, params: GenerationParams, device: str = "cpu"
) -> Image.Image:
    return Pipeline(model_dir, device).generate(prompt, params).image
