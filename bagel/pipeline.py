"""The whole generation in one process, text-to-image and image editing: the reference every
other path is compared against. fp32 on CPU, bf16 on CUDA."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from bagel.autoencoder import AutoEncoder
from bagel.checkpoint import load_autoencoder, load_bagel, load_vit
from bagel.config import BagelConfig
from bagel.contexts import (
    ContextEncoder,
    EditImage,
    EditResize,
    edit_segments,
    prepare_edit_image,
)
from bagel.devices import default_dtype
from bagel.fp8 import LinearPrecision
from bagel.generation import BlockVelocity, ForwardGraphs, latent_position_ids
from bagel.kv import Branch, ContextKV
from bagel.model import Bagel
from bagel.params import ImageParams
from bagel.pixels import decode_image
from bagel.preview import LatentRGB, fit_latent_rgb
from bagel.prompts import cfg_prompts
from bagel.sampler import EstimateCallback, StepCallback, denoise, initial_noise
from bagel.step_cache import StepCache
from bagel.tokenizer import PromptTokenizer, load_tokenizer
from bagel.vit import ViTConfig


@dataclass
class Generated:
    image: Image.Image
    latents: Tensor  # final latent tokens [h*w, patch_dim], fp32


class Pipeline:
    """Loads a checkpoint directory once; generates images from prompts or from prefilled KV."""

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        linear_precision: LinearPrecision = "bf16",
    ) -> None:
        """`linear_precision="fp8"`: the decoder's linear layers in e4m3 (`bagel.fp8`)."""
        self.device = torch.device(device)
        self.dtype = dtype or default_dtype(device)
        self.config = BagelConfig.from_dir(model_dir)
        self.tokenizer: PromptTokenizer = load_tokenizer(model_dir)
        self.model: Bagel = load_bagel(
            model_dir, "diffusion", self.dtype, self.device, self.config, linear_precision
        )
        self.autoencoder: AutoEncoder = load_autoencoder(model_dir, self.dtype, self.device)
        self.graphs = ForwardGraphs() if self.device.type == "cuda" else None
        self.model_dir = Path(model_dir)
        self._context_encoder: ContextEncoder | None = None

    @property
    def context_encoder(self) -> ContextEncoder:
        """Image-edit contexts; the ViT is loaded on first use."""
        if self._context_encoder is None:
            vit = load_vit(self.model_dir, self.dtype, self.device, self.vit_config)
            self._context_encoder = ContextEncoder(
                self.model, vit, self.autoencoder, self.tokenizer
            )
        return self._context_encoder

    def edit_image(self, image: Image.Image, rules: EditResize | None = None) -> EditImage:
        """`image` resized for an edit (the reference's rules unless `rules` says otherwise)."""
        return prepare_edit_image(
            image, rules or EditResize.reference(self.config, self.vit_config)
        )

    @cached_property
    def vit_config(self) -> ViTConfig:
        return ViTConfig.from_dir(self.model_dir)

    @property
    def marker_ids(self) -> tuple[int, int]:
        return (self.tokenizer.start_of_image, self.tokenizer.end_of_image)

    def prefill(self, prompt: str, negative_prompt: str = "") -> dict[Branch, ContextKV]:
        prompts = cfg_prompts(self.tokenizer, prompt, negative_prompt)
        return dict(zip(prompts, self.model.prefill(list(prompts.values())), strict=True))

    def edit_contexts(
        self, image: EditImage, prompt: str, negative_prompt: str = ""
    ) -> dict[Branch, ContextKV]:
        """An edit's three contexts (`bagel.contexts.edit_segments`), prefilled."""
        prompts = cfg_prompts(self.tokenizer, prompt, negative_prompt)
        segments = edit_segments(
            image.segments(self.config), prompts[Branch.COND], prompts[Branch.UNCOND_TEXT]
        )
        return self.context_encoder.prefill(segments, image)

    def denoise(
        self,
        contexts: Mapping[Branch, ContextKV],
        params: ImageParams,
        batch_branches: bool = True,
        on_step: StepCallback | None = None,
        step_cache: StepCache | None = None,
        on_estimate: EstimateCallback | None = None,
        estimate_steps: frozenset[int] = frozenset(),
    ) -> Tensor:
        """Callers validate `params` first (`serving.params.GenerationParams.validate`).
        `on_estimate` sees the clean-image estimate after each step in `estimate_steps`."""
        rows, cols = self.config.latent_grid(params.height, params.width)
        velocity = BlockVelocity(
            self.model,
            contexts,
            latent_position_ids(rows, cols, self.config.max_latent_size),
            self.marker_ids,
            batch_branches=batch_branches,
            graphs=self.graphs,  # only takes effect on a GPU
            step_cache=step_cache,
        )
        x = initial_noise(params, rows * cols, self.config.patch_dim)
        return denoise(
            x,
            velocity,
            params,
            has_img_context=Branch.UNCOND_IMG in contexts,
            on_step=on_step,
            step_cache=step_cache,
            on_estimate=on_estimate,
            estimate_steps=estimate_steps,
        )

    @cached_property
    def latent_rgb(self) -> LatentRGB:
        """The previews' latent -> RGB map (`bagel.preview`), fitted on first use."""
        return fit_latent_rgb(self.autoencoder)

    def preview(self, latents: Tensor, height: int, width: int) -> np.ndarray:
        """A preview of latent tokens `[h*w, patch_dim]`: uint8 RGB at 1/8 of the image's side."""
        rows, cols = self.config.latent_grid(height, width)
        return self.latent_rgb.pixels(latents, rows, cols, self.config.latent_patch_size)

    def decode(self, latents: Tensor, height: int, width: int) -> Image.Image:
        return decode_image(self.autoencoder, self.config, latents, height, width, self.graphs)

    def generate(self, prompt: str, params: ImageParams) -> Generated:
        latents = self.denoise(self.prefill(prompt, params.negative_prompt), params)
        return Generated(image=self.decode(latents, params.height, params.width), latents=latents)

    def edit(
        self,
        image: Image.Image,
        prompt: str,
        params: ImageParams,
        rules: EditResize | None = None,
    ) -> Generated:
        """Edit `image` as `prompt` says. `params` gives the output size: callers default it to
        the input's resized size (`edit_image(image).width/height`)."""
        edit_image = self.edit_image(image, rules)
        contexts = self.edit_contexts(edit_image, prompt, params.negative_prompt)
        latents = self.denoise(contexts, params)
        return Generated(image=self.decode(latents, params.height, params.width), latents=latents)


def generate(
    model_dir: str | Path, prompt: str, params: ImageParams, device: str = "cpu"
) -> Image.Image:
    return Pipeline(model_dir, device).generate(prompt, params).image
