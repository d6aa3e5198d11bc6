"""The CFG contexts of an image edit, as BAGEL's reference builds them (`update_context_image`,
then `update_context_text`), and their prefill.

A context is a list of segments, each appended to the KV cache in turn:
- an image's VAE segment: `<|vision_start|>`, the clean latent tokens (gen expert, flow time 0,
  `latent_pos_embed`), `<|vision_end|>`; then its ViT segment: the markers around the SigLIP
  tokens (und expert, `connector` + `vit_pos_embed`). Each image segment sits at one RoPE
  position and attends within itself without a causal mask;
- a text segment: `<|im_start|>` text `<|im_end|>`, causal, one RoPE position per token.
Every token sees all earlier segments. An edit's three contexts:
- `cond` = image + prompt;
- `uncond_text` = image (+ the negative prompt, if any);
- `uncond_img` = prompt only.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor

from bagel.network.autoencoder import AutoEncoder
from bagel.network.config import BagelConfig
from bagel.network.kv import Branch, ContextKV
from bagel.network.latents import latent_position_ids, patchify
from bagel.network.model import Bagel, MixedSequence
from bagel.network.vit import ImageContextEncoder, ViTConfig
from bagel.prompting.image_transforms import ResizeRule, patchify_vit, resize, to_rgb, to_tensor
from bagel.text.tokenizer import PromptTokenizer

VIT_MIN_SIZE = 224


class SegmentKind(enum.Enum):
    TEXT = "text"
    VAE_IMAGE = "vae"
    VIT_IMAGE = "vit"


@dataclass(frozen=True)
class Segment:
    kind: SegmentKind
    num_tokens: int  # markers included
    token_ids: tuple[int, ...] = ()  # TEXT only

    @property
    def rope_span(self) -> int:
        """RoPE positions the segment takes: one per text token, one for a whole image."""
        return self.num_tokens if self.kind is SegmentKind.TEXT else 1

    @property
    def causal(self) -> bool:
        return self.kind is SegmentKind.TEXT


def text_segment(token_ids: Sequence[int]) -> list[Segment]:
    return [Segment(SegmentKind.TEXT, len(token_ids), tuple(token_ids))] if token_ids else []


def num_tokens(segments: Sequence[Segment]) -> int:
    return sum(s.num_tokens for s in segments)


def next_rope_position(segments: Sequence[Segment]) -> int:
    return sum(s.rope_span for s in segments)


@dataclass(frozen=True)
class EditResize:
    """How an input image is resized for its two paths. The reference's transforms are settings
    of its inferencer, not of the checkpoint: `reference` gives them (VAE: longest side 1024,
    shortest 512, stride 16; ViT: longest 980, shortest 224, stride 14); a deployment or a test
    may choose smaller ones."""

    vae: ResizeRule
    vit: ResizeRule

    @classmethod
    def reference(cls, config: BagelConfig, vit: ViTConfig) -> EditResize:
        vae_max = config.max_image_size  # 1024 for BAGEL-7B-MoT
        vit_max = vit.max_patches_per_side * vit.patch_size  # 980
        return cls(
            vae=ResizeRule(max_size=vae_max, min_size=min(512, vae_max), stride=16),
            vit=ResizeRule(max_size=vit_max, min_size=min(VIT_MIN_SIZE, vit_max), stride=14),
        )

    def check(self, config: BagelConfig, vit: ViTConfig) -> None:
        """Raise ValueError if the rules can produce sizes the model cannot take."""
        if self.vae.stride % config.pixels_per_token or self.vae.max_size > config.max_image_size:
            raise ValueError(
                f"the VAE resize (stride {self.vae.stride}, longest side {self.vae.max_size}) "
                f"must use a multiple of {config.pixels_per_token} and stay within "
                f"{config.max_image_size}"
            )
        vit_max = vit.max_patches_per_side * vit.patch_size
        if self.vit.stride != vit.patch_size or self.vit.max_size > vit_max:
            raise ValueError(
                f"the ViT resize (stride {self.vit.stride}, longest side {self.vit.max_size}) "
                f"must use stride {vit.patch_size} and stay within {vit_max}"
            )


@dataclass(frozen=True)
class EditImage:
    """An input image, resized the reference's way: once by the VAE rule (this is also the
    output size an edit defaults to), then the VAE-sized image by the ViT rule."""

    vae_pixels: Tensor  # [3, H, W] in [-1, 1]
    vit_pixels: Tensor  # [3, H', W'] in [-1, 1]
    patch_size: int  # the ViT's

    @property
    def width(self) -> int:
        return self.vae_pixels.shape[2]

    @property
    def height(self) -> int:
        return self.vae_pixels.shape[1]

    def segments(self, config: BagelConfig) -> list[Segment]:
        rows, cols = config.latent_grid(self.height, self.width)
        vit_rows, vit_cols = (s // self.patch_size for s in self.vit_pixels.shape[1:])
        return [
            Segment(SegmentKind.VAE_IMAGE, rows * cols + 2),
            Segment(SegmentKind.VIT_IMAGE, vit_rows * vit_cols + 2),
        ]


def prepare_edit_image(image: Image.Image, rules: EditResize) -> EditImage:
    resized = resize(to_rgb(image), rules.vae)
    return EditImage(
        vae_pixels=to_tensor(resized),
        vit_pixels=to_tensor(resize(resized, rules.vit)),
        patch_size=rules.vit.stride,
    )


def edit_segments(
    image_segments: Sequence[Segment], prompt_ids: Sequence[int], negative_ids: Sequence[int]
) -> dict[Branch, list[Segment]]:
    """An edit's three contexts (the reference's `interleave_inference` with [image, prompt]):
    `cfg_text` is the context as it stood after the image, `cfg_img` the prompt alone."""
    return {
        Branch.COND: [*image_segments, *text_segment(prompt_ids)],
        Branch.UNCOND_TEXT: [*image_segments, *text_segment(negative_ids)],
        Branch.UNCOND_IMG: text_segment(prompt_ids),
    }


def prefix_sources(contexts: Sequence[Sequence[Segment]]) -> list[int | None]:
    """For each context, the longest other context that starts with it (its KV is then the
    start of that one's), or None. An edit's `uncond_text` without a negative prompt is the
    start of its `cond`."""
    sources: list[int | None] = []
    for i, c in enumerate(contexts):
        longer = [
            j
            for j, other in enumerate(contexts)
            if j != i and len(other) > len(c) and list(other[: len(c)]) == list(c)
        ]
        has_tokens = num_tokens(c) > 0
        best = max(longer, key=lambda j: num_tokens(contexts[j]), default=None)
        sources.append(best if has_tokens else None)
    return sources


def attention_mask(segments: Sequence[Segment], device: torch.device) -> Tensor:
    """`[L, L]` bool: every token sees all earlier segments, and within its own segment all
    tokens (image) or those up to itself (text)."""
    length = num_tokens(segments)
    segment_of = torch.repeat_interleave(
        torch.arange(len(segments), device=device),
        torch.tensor([s.num_tokens for s in segments], device=device),
    )
    causal = torch.tensor([s.causal for s in segments], device=device)[segment_of]
    row, col = segment_of[:, None], segment_of[None, :]
    token = torch.arange(length, device=device)
    within = (row == col) & (~causal[:, None] | (token[None, :] <= token[:, None]))
    return (col < row) | within


def mixed_sequence(
    model: Bagel,
    segments: Sequence[Segment],
    images: Mapping[SegmentKind, tuple[Tensor, Tensor]] | None = None,
) -> MixedSequence:
    """`segments` as the model's input: text embedded here, each image segment's embeddings
    taken from `images` (`ContextEncoder.image_embeddings` or `vit_embeddings`)."""
    images = images or {}
    weight = model.language_model.model.embed_tokens.weight
    device = weight.device
    embeds, gens, positions = [], [], []
    position = 0
    for segment in segments:
        if segment.kind is SegmentKind.TEXT:
            ids = torch.tensor(segment.token_ids, dtype=torch.long, device=device)
            embeds.append(model.language_model.model.embed_tokens(ids))
            gens.append(torch.zeros(segment.num_tokens, dtype=torch.bool, device=device))
            positions.append(torch.arange(position, position + segment.num_tokens))
        else:
            embed, gen = images[segment.kind]
            embeds.append(embed)
            gens.append(gen)
            positions.append(torch.full((segment.num_tokens,), position))
        position += segment.rope_span
    gen = torch.cat(gens)
    return MixedSequence(
        embeddings=torch.cat(embeds),
        gen_index=gen.nonzero().flatten(),
        und_index=(~gen).nonzero().flatten(),
        positions=torch.cat(positions).to(device),
        mask=attention_mask(segments, device),
    )


class ContextEncoder:
    """Turns segments into `MixedSequence`s and prefills them: BAGEL's model with both experts,
    the ViT with its connector, and the VAE encoder."""

    def __init__(
        self,
        model: Bagel,
        vit: ImageContextEncoder,
        autoencoder: AutoEncoder | None,
        tokenizer: PromptTokenizer,
    ) -> None:
        """Without the gen expert or `autoencoder` it encodes images through the ViT only
        (`vit_embeddings`: understanding); an edit's VAE tokens need both."""
        self.model = model
        self.vit = vit
        self.autoencoder = autoencoder
        self.config: BagelConfig = model.config
        self.markers = (tokenizer.start_of_image, tokenizer.end_of_image)

    @property
    def _weight(self) -> Tensor:
        return self.model.language_model.model.embed_tokens.weight

    @torch.no_grad()
    def image_embeddings(self, image: EditImage) -> dict[SegmentKind, tuple[Tensor, Tensor]]:
        """Each image segment's token embeddings `[n, hidden]` (markers included, in order) and
        the mask of its gen-expert tokens."""
        if not self.model.with_gen or self.autoencoder is None:
            raise ValueError("an edit context needs the gen expert (the VAE tokens use it)")
        weight = self._weight
        markers = torch.tensor(self.markers, device=weight.device)
        start, end = self.model.language_model.model.embed_tokens(markers).split(1)
        # VAE: the posterior mean (the reference samples it; the mean keeps an edit deterministic)
        pixels = image.vae_pixels[None].to(weight.device, next(self.autoencoder.parameters()).dtype)
        latent = self.autoencoder.encode(pixels)[0]
        rows, cols = self.config.latent_grid(image.height, image.width)
        tokens = patchify(latent, self.config.latent_patch_size)
        pos_ids = latent_position_ids(rows, cols, self.config.max_latent_size).to(weight.device)
        _, vae = self.model.embed_block(
            tokens, torch.zeros((), device=weight.device), pos_ids, markers, batch=1
        )
        vae = torch.cat([start, vae[0].to(weight.dtype), end])
        vae_gen = torch.zeros(vae.shape[0], dtype=torch.bool, device=weight.device)
        vae_gen[1:-1] = True
        return {SegmentKind.VAE_IMAGE: (vae, vae_gen), **self.vit_embeddings(image)}

    @torch.no_grad()
    def vit_embeddings(self, image: EditImage) -> dict[SegmentKind, tuple[Tensor, Tensor]]:
        """The ViT segment's token embeddings `[n, hidden]` (markers included) and its (empty)
        gen-expert mask: all an understanding request's image needs."""
        weight = self._weight
        markers = torch.tensor(self.markers, device=weight.device)
        start, end = self.model.language_model.model.embed_tokens(markers).split(1)
        patches, vit_ids = patchify_vit(image.vit_pixels, image.patch_size)
        vit_weight = next(self.vit.parameters())
        vit = self.vit(patches.to(vit_weight.device, vit_weight.dtype), vit_ids.to(weight.device))
        vit = torch.cat([start, vit.to(weight.dtype), end])
        vit_gen = torch.zeros(vit.shape[0], dtype=torch.bool, device=weight.device)
        return {SegmentKind.VIT_IMAGE: (vit, vit_gen)}

    def sequence(
        self,
        segments: Sequence[Segment],
        images: Mapping[SegmentKind, tuple[Tensor, Tensor]],
    ) -> MixedSequence:
        return mixed_sequence(self.model, segments, images)

    def layers(
        self, contexts: Sequence[Sequence[Segment]], image: EditImage
    ) -> Iterator[list[tuple[Tensor, Tensor]]]:
        """Each layer's (K, V) `[tokens, kv_heads, head_dim]` of every context, in order, as soon
        as that layer exists. A context that is the start of another is sliced from it, not
        recomputed (an edit's `uncond_text` is the start of its `cond`)."""
        contexts = [list(c) for c in contexts]
        source = [i if j is None else j for i, j in enumerate(prefix_sources(contexts))]
        computed = sorted(set(source))
        images = (
            self.image_embeddings(image)
            if any(s.kind is not SegmentKind.TEXT for c in contexts for s in c)
            else {}
        )
        runs = {
            j: self.model.prefill_mixed_layers(self.sequence(contexts[j], images)) for j in computed
        }
        for _ in range(len(self.model.layers)):
            layer = {j: next(run) for j, run in runs.items()}
            yield [
                (layer[source[i]][0][: num_tokens(c)], layer[source[i]][1][: num_tokens(c)])
                for i, c in enumerate(contexts)
            ]

    def prefill(
        self, contexts: Mapping[Branch, Sequence[Segment]], image: EditImage
    ) -> dict[Branch, ContextKV]:
        """The whole KV of each context (the in-process path)."""
        branches = list(contexts)
        keys: list[list[Tensor]] = [[] for _ in branches]
        values: list[list[Tensor]] = [[] for _ in branches]
        for layer in self.layers([contexts[b] for b in branches], image):
            for i, (k, v) in enumerate(layer):
                keys[i].append(k)
                values[i].append(v)
        return {
            b: ContextKV(keys[i], values[i], next_rope_position(contexts[b]))
            for i, b in enumerate(branches)
        }
