"""Prompt -> CFG contexts -> KV frames: tokenizing and checking a request's contexts (cheap, before
any compute), then computing their KV layer by layer and encoding each layer as soon as it exists.

A `KVSource` is where the KV comes from: `LanguageModelKV` (the und expert) or the synthetic one in
`prefill_service.mock`; everything after the source is shared. The service runs a request's
`request_frames` on its KV-prefill worker thread (`prefill_service.kv_worker`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from PIL import Image
from torch import Tensor

from bagel.checkpoints.checkpoint import load_autoencoder, load_bagel, load_vit
from bagel.devices import default_dtype
from bagel.network.config import BagelConfig
from bagel.network.kv import Branch
from bagel.network.vit import ViTConfig
from bagel.prompting.contexts import (
    ContextEncoder,
    EditResize,
    SegmentKind,
    edit_segments,
    next_rope_position,
    num_tokens,
    prefix_sources,
    prepare_edit_image,
)
from bagel.prompting.conversation import think_segments
from bagel.prompting.conversation import token_ids as token_ids_of
from bagel.prompting.image_transforms import resized_size
from bagel.prompting.prompts import cfg_prompts
from bagel.text.tokenizer import load_tokenizer
from serving.errors import InvalidParams
from serving.params import GenerationParams
from transport import DEFAULT_CHUNK_SIZE, ContextSpec, KVEncoder, KVLayout

NO_IMAGE_INPUT = "this prefill service takes no input images (it was started with --no-image-input)"
MAX_PROMPT_CHARS = 16_384  # checked before tokenizing, so a huge prompt costs nothing
DEFAULT_MAX_PROMPT_TOKENS = 2048  # per context, framing tokens included

LayerKV = Sequence[tuple[Tensor, Tensor]]  # one layer: (K, V) per context, in plan order


@dataclass(frozen=True)
class PlannedKV:
    """One request's contexts, known before any compute, and the computation of their KV."""

    contexts: tuple[ContextSpec, ...]
    compute: Callable[[], Iterator[LayerKV]]  # yields each layer as soon as it is produced
    # Per context, its prompt tokens (framing included), where an image adds tokens of its own;
    # None: all of a context's tokens are prompt tokens.
    text_tokens: tuple[int, ...] | None = None


class KVSource(Protocol):
    """Where a request's KV cache comes from."""

    config: BagelConfig
    dtype: torch.dtype

    def plan(
        self, prompt: str, params: GenerationParams, think_plan: str | None = None
    ) -> PlannedKV:
        """Check the prompt text (raise InvalidParams) and tokenize it into the contexts it makes;
        no model compute. `think_plan`: a think request's decoded plan, which the conditional
        context ends with."""
        ...


@runtime_checkable
class EditKVSource(KVSource, Protocol):
    """A source that also prefills image edits (an input image and a prompt)."""

    @property
    def supports_edits(self) -> bool:
        """Whether this source's checkpoint can encode input images."""
        ...

    def edit_size(self, image: Image.Image) -> tuple[int, int]:
        """(width, height) the input is resized to: an edit's default output size."""
        ...

    def plan_edit(
        self,
        prompt: str,
        params: GenerationParams,
        image: Image.Image,
        think_plan: str | None = None,
    ) -> PlannedKV:
        """As `plan`, for an edit's three contexts (`bagel.prompting.contexts.edit_segments`)."""
        ...


def check_prompt_text(prompt: str) -> None:
    """The prompt's own checks; the negative prompt is a schema field, checked with the rest."""
    if not prompt.strip():
        raise InvalidParams("prompt is empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidParams(f"prompt is longer than {MAX_PROMPT_CHARS} characters")


def token_limit(config: BagelConfig, max_prompt_tokens: int) -> int:
    """Tokens a context may have: the configured limit, and below the model's RoPE range (the
    generation block sits at the position after the prompt)."""
    return min(max_prompt_tokens, config.llm.max_position_embeddings - 1)


def prompt_tokens(planned: PlannedKV) -> int:
    """The request's input tokens as usage counts them: the conditional context's, image tokens
    included (the other contexts are parts of it, or the negative prompt)."""
    return next(c.num_tokens for c in planned.contexts if c.kind == Branch.COND)


def check_token_counts(planned: PlannedKV, limit: int) -> None:
    counts = planned.text_tokens or tuple(c.num_tokens for c in planned.contexts)
    for c, count in zip(planned.contexts, counts, strict=True):
        if count > limit:
            what = "negative_prompt" if c.kind == Branch.UNCOND_TEXT else "prompt"
            raise InvalidParams(
                f"{what} is {count} tokens long with its framing; the limit is {limit}"
            )


class LanguageModelKV:
    """The real source: BAGEL's tokenizer and language model. Text-to-image needs only the und
    expert (`load_bagel(..., "prefill")`); with `image_input` (image editing) it also loads the
    gen expert (the input's VAE tokens use it), the ViT and the VAE encoder."""

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "cpu",
        *,
        dtype: torch.dtype | None = None,
        image_input: bool = True,
        edit_resize: EditResize | None = None,
    ) -> None:
        self.config = BagelConfig.from_dir(model_dir)
        self.dtype = dtype or default_dtype(device)
        self.tokenizer = load_tokenizer(model_dir)
        # HF fast tokenizers may reconfigure themselves inside encode; calls must not overlap.
        self._tokenizer_lock = threading.Lock()
        role = "diffusion" if image_input else "prefill"  # "diffusion": both experts
        # The LM head too: the same model decodes text (`prefill_service.text`).
        self.model = load_bagel(model_dir, role, self.dtype, device, self.config, lm_head=True)
        self.contexts: ContextEncoder | None = None
        self.edit_resize = edit_resize
        if image_input:
            vit = ViTConfig.from_dir(model_dir)
            self.edit_resize = edit_resize or EditResize.reference(self.config, vit)
            self.edit_resize.check(self.config, vit)
            self.contexts = ContextEncoder(
                self.model,
                load_vit(model_dir, self.dtype, device, vit),
                load_autoencoder(model_dir, self.dtype, device),
                self.tokenizer,
            )

    @property
    def supports_edits(self) -> bool:
        return self.contexts is not None

    def edit_size(self, image: Image.Image) -> tuple[int, int]:
        if self.edit_resize is None:
            raise InvalidParams(NO_IMAGE_INPUT)
        return resized_size(*image.size, self.edit_resize.vae)

    def plan_edit(
        self,
        prompt: str,
        params: GenerationParams,
        image: Image.Image,
        think_plan: str | None = None,
    ) -> PlannedKV:
        """With `think_plan` (a think request's decoded plan) the contexts are
        `bagel.prompting.conversation.think_segments`' with the image."""
        check_prompt_text(prompt)
        if self.contexts is None or self.edit_resize is None:
            raise InvalidParams(NO_IMAGE_INPUT)
        edit_image = prepare_edit_image(image, self.edit_resize)
        with self._tokenizer_lock:
            if think_plan is not None:
                segments = think_segments(
                    self.tokenizer,
                    prompt,
                    think_plan,
                    params.negative_prompt,
                    edit_image.segments(self.config),
                )
            else:
                prompts = cfg_prompts(self.tokenizer, prompt, params.negative_prompt)
                segments = edit_segments(
                    edit_image.segments(self.config),
                    prompts[Branch.COND],
                    prompts[Branch.UNCOND_TEXT],
                )
        # A context that is the start of another travels as a reference to it, not as bytes.
        sources = prefix_sources(list(segments.values()))
        contexts = tuple(
            ContextSpec(int(kind), num_tokens(s), next_rope_position(s), source)
            for (kind, s), source in zip(segments.items(), sources, strict=True)
        )
        text_tokens = tuple(
            sum(x.num_tokens for x in s if x.kind is SegmentKind.TEXT) for s in segments.values()
        )
        encoder = self.contexts
        return PlannedKV(
            contexts,
            lambda: encoder.layers(list(segments.values()), edit_image),
            text_tokens=text_tokens,
        )

    def plan(
        self, prompt: str, params: GenerationParams, think_plan: str | None = None
    ) -> PlannedKV:
        """With `think_plan`: the three contexts of
        `bagel.prompting.conversation.think_segments`."""
        check_prompt_text(prompt)
        with self._tokenizer_lock:
            if think_plan is not None:
                segments = think_segments(
                    self.tokenizer, prompt, think_plan, params.negative_prompt
                )
                prompts = {kind: token_ids_of(s) for kind, s in segments.items()}
            else:
                prompts = cfg_prompts(self.tokenizer, prompt, params.negative_prompt)
        token_ids = list(prompts.values())
        contexts = tuple(
            ContextSpec(int(kind), len(ids), len(ids)) for kind, ids in prompts.items()
        )
        return PlannedKV(contexts, lambda: self.layers(token_ids))

    def layers(self, token_ids: list[list[int]]) -> Iterator[LayerKV]:
        """All contexts prefilled as one batch; each layer's K/V as soon as it is computed."""
        for keys, values in self.model.prefill_layers(token_ids):
            yield list(zip(keys, values, strict=True))


@dataclass
class PrefillStats:
    """Measured while the frames of one request are produced (on the KV-prefill worker)."""

    layers_done: int = 0
    compute_s: float = 0.0  # time spent computing layers, encoding excluded


def kv_layout(source: KVSource, planned: PlannedKV) -> KVLayout:
    llm = source.config.llm
    return KVLayout(source.dtype, llm.num_layers, llm.num_kv_heads, llm.head_dim, planned.contexts)


def request_frames(
    source: KVSource,
    planned: PlannedKV,
    *,
    request_id: str,
    params: GenerationParams,
    stats: PrefillStats,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Iterator[list[bytes]]:
    """The serialized `DiffusionFrame`s of one request in batches: [header], then each layer's
    chunks as soon as that layer is computed, then [trailer]. Lazy: computes nothing until
    iterated, and each `next` computes at most one layer."""
    layout = kv_layout(source, planned)
    encoder = KVEncoder(
        layout,
        request_id=request_id,
        fingerprint=source.config.fingerprint(),
        params=params.to_proto(),
        chunk_size=chunk_size,
    )
    yield [encoder.header()]
    layers = planned.compute()
    try:
        for index in range(layout.num_layers):
            started = time.perf_counter()
            pairs = next(layers, None)
            stats.compute_s += time.perf_counter() - started
            if pairs is None:
                raise RuntimeError(
                    f"the KV source stopped after {index} of {layout.num_layers} layers"
                )
            yield list(encoder.layer(index, pairs))
            stats.layers_done = index + 1
    finally:
        close = getattr(layers, "close", None)
        if close is not None:
            close()
    yield [encoder.trailer()]
