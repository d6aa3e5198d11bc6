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

from bagel.checkpoints.checkpoint import load_autoencoder, load_bagel, load_vit
from bagel.devices import default_dtype
from bagel.diffusion.generation import BlockVelocity, ForwardGraphs
from bagel.diffusion.params import ImageParams
from bagel.diffusion.pixels import decode_image
from bagel.diffusion.preview import LatentRGB, fit_latent_rgb
from bagel.diffusion.sampler import EstimateCallback, StepCallback, denoise, initial_noise
from bagel.diffusion.step_cache import StepCache
from bagel.network.attention import AttentionPrecision, block_attention
from bagel.network.autoencoder import AutoEncoder
from bagel.network.config import BagelConfig
from bagel.network.fp8 import LinearPrecision
from bagel.network.kv import Branch, ContextKV
from bagel.network.latents import latent_position_ids
from bagel.network.model import Bagel
from bagel.network.vit import ViTConfig
from bagel.prompting.contexts import (
    ContextEncoder,
    EditImage,
    EditResize,
    edit_segments,
    mixed_sequence,
    next_rope_position,
    prepare_edit_image,
)
from bagel.prompting.conversation import plan_segments, think_segments, token_ids
from bagel.prompting.prompts import cfg_prompts
from bagel.text.decoding import Sampling, decode
from bagel.text.tokenizer import PROMPT_END_TOKEN, PromptTokenizer, load_tokenizer


@dataclass
class Generated:
    image: Image.Image
    latents: Tensor  # final latent tokens [h*w, patch_dim], fp32
    plan: str = ""  # think mode: the plan the image was drawn from


class Pipeline:
    """Loads a checkpoint directory once; generates images from prompts or from prefilled KV."""

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        linear_precision: LinearPrecision = "bf16",
        attention_precision: AttentionPrecision = "bf16",
    ) -> None:
        """`linear_precision="fp8"`: the decoder's linear layers in e4m3 (`bagel.network.fp8`);
        `attention_precision="fp8"`: the generation block's attention in e4m3
        (`bagel.network.attention`), as `--attention-precision fp8` on the diffusion service."""
        self.attention = block_attention(attention_precision)
        self.device = torch.device(device)
        self.dtype = dtype or default_dtype(device)
        self.config = BagelConfig.from_dir(model_dir)
        self.tokenizer: PromptTokenizer = load_tokenizer(model_dir)
        # The LM head decodes a think request's plan.
        self.model: Bagel = load_bagel(
            model_dir,
            "diffusion",
            self.dtype,
            self.device,
            self.config,
            linear_precision,
            lm_head=linear_precision != "fp8",
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
        """An edit's three contexts (`bagel.prompting.contexts.edit_segments`), prefilled."""
        prompts = cfg_prompts(self.tokenizer, prompt, negative_prompt)
        segments = edit_segments(
            image.segments(self.config), prompts[Branch.COND], prompts[Branch.UNCOND_TEXT]
        )
        return self.context_encoder.prefill(segments, image)

    def plan(self, prompt: str, sampling: Sampling, image: EditImage | None = None) -> str:
        """Think mode: the plan decoded from the system prompt, the input image (an edit) and
        the prompt, as text without its end token (`bagel.prompting.conversation.plan_segments`)."""
        image_segments = image.segments(self.config) if image is not None else []
        segments = plan_segments(self.tokenizer, prompt, image_segments)
        images = self.context_encoder.image_embeddings(image) if image is not None else {}
        prompt_seq = mixed_sequence(self.model, segments, images)
        end = self.tokenizer.special_ids[PROMPT_END_TOKEN]
        decoded = decode(self.model, prompt_seq, next_rope_position(segments), sampling, end)
        tokens = decoded.tokens[:-1] if decoded.finish == "stop" else decoded.tokens
        return self.tokenizer.decode(tokens)

    def think_contexts(
        self, prompt: str, plan: str, negative_prompt: str = "", image: EditImage | None = None
    ) -> dict[Branch, ContextKV]:
        """The three contexts of a think request once its plan is decoded
        (`bagel.prompting.conversation.think_segments`), prefilled as the prefill service does:
        text-only ones as one batch of prompts, an edit's through the context encoder."""
        if image is None:
            segments = think_segments(self.tokenizer, prompt, plan, negative_prompt)
            prompts = [token_ids(s) for s in segments.values()]
            return dict(zip(segments, self.model.prefill(prompts), strict=True))
        segments = think_segments(
            self.tokenizer, prompt, plan, negative_prompt, image.segments(self.config)
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
            attention=self.attention,
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
        """The previews' latent -> RGB map (`bagel.diffusion.preview`), fitted on first use."""
        return fit_latent_rgb(self.autoencoder)

    def preview(self, latents: Tensor, height: int, width: int) -> np.ndarray:
        """A preview of latent tokens `[h*w, patch_dim]`: uint8 RGB at 1/8 of the image's side."""
        rows, cols = self.config.latent_grid(height, width)
        return self.latent_rgb.pixels(latents, rows, cols, self.config.latent_patch_size)

    def decode(self, latents: Tensor, height: int, width: int) -> Image.Image:
        return decode_image(self.autoencoder, self.config, latents, height, width, self.graphs)

    def generate(
        self, prompt: str, params: ImageParams, think: Sampling | None = None
    ) -> Generated:
        """With `think`, the model first decodes a plan with those settings (`plan`), and the
        image is drawn from `think_contexts`."""
        plan = ""
        if think is not None:
            plan = self.plan(prompt, think)
            contexts = self.think_contexts(prompt, plan, params.negative_prompt)
        else:
            contexts = self.prefill(prompt, params.negative_prompt)
        latents = self.denoise(contexts, params)
        image = self.decode(latents, params.height, params.width)
        return Generated(image=image, latents=latents, plan=plan)

    def edit(
        self,
        image: Image.Image,
        prompt: str,
        params: ImageParams,
        rules: EditResize | None = None,
        think: Sampling | None = None,
    ) -> Generated:
        """Edit `image` as `prompt` says. `params` gives the output size: callers default it to
        the input's resized size (`edit_image(image).width/height`). `think` as `generate`."""
        edit_image = self.edit_image(image, rules)
        plan = ""
        if think is not None:
            plan = self.plan(prompt, think, edit_image)
            contexts = self.think_contexts(prompt, plan, params.negative_prompt, edit_image)
        else:
            contexts = self.edit_contexts(edit_image, prompt, params.negative_prompt)
        latents = self.denoise(contexts, params)
        image = self.decode(latents, params.height, params.width)
        return Generated(image=image, latents=latents, plan=plan)


def generate(
    model_dir: str | Path, prompt: str, params: ImageParams, device: str = "cpu"
) -> Image.Image:
    return Pipeline(model_dir, device).generate(prompt, params).image
