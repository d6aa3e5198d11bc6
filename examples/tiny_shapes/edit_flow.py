"""The training forward of an edit: the served three-context path (`bagel.prompting.contexts`) for a
batch of samples that each have their own context, then BAGEL's rectified-flow objective on the
target.

Every sample's context takes the same slots, absent parts masked out as keys:

    [<|vision_start|> source latents <|vision_end|>] [<|vision_start|> ViT tokens <|vision_end|>]
    [<|im_start|> instruction or caption <|im_end|>, right-padded]

- the VAE segment: the input image's clean latent tokens (`vae2llm` + `time_embedder(0)` +
  `latent_pos_embed`) by the gen expert, its markers by the und expert, all at RoPE position 0,
  attending within the segment;
- the ViT segment: `connector(vit(patches)) + vit_pos_embed` by the und expert, at position 1;
- the text: causal, one position per token from 2 (from 0 without the image).

With both image segments and the text this is the `cond` context; without the text `uncond_text`
(cfg_text); without the image `uncond_img` (cfg_img), or a text-to-image prompt; without either
the empty context. The generation block then attends to the real keys (`flow.block_velocity`). A
test holds this equal to `ContextEncoder.prefill` + `BlockVelocity` within 1e-5 in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bagel.network.attention import masked_sdpa
from bagel.network.model import GEN, UND, Bagel
from bagel.network.vit import ImageContextEncoder
from examples.tiny_shapes.flow import PrefixKV, block_velocity

IMAGE_SEGMENT, VIT_SEGMENT, TEXT_SEGMENT = 0, 1, 2


@dataclass
class EditContexts:
    """A batch of contexts in the slot layout above."""

    source_tokens: Tensor  # [B, n, patch_dim]: the input image's clean latent tokens
    vit_patches: Tensor  # [B, m, p*p*c]: its ViT patches (every image the same size)
    vit_ids: Tensor  # [m]: their NaViT position ids
    has_image: Tensor  # [B] bool: both image segments are in the context
    text_ids: Tensor  # [B, P] right-padded `<|im_start|> text <|im_end|>`
    text_lengths: Tensor  # [B]: 0 drops the text

    @property
    def batch(self) -> int:
        return self.text_ids.shape[0]


def vit_tokens(vit: ImageContextEncoder, patches: Tensor, ids: Tensor) -> Tensor:
    """`ImageContextEncoder.forward` for a batch of same-sized images: `[B, m, hidden]`."""
    return vit.connector(vit.vision_model(patches, ids)) + vit.vit_pos_embed(ids)


def _layout(contexts: EditContexts, n: int, m: int) -> tuple[Tensor, Tensor, Tensor]:
    """(RoPE positions `[B, L]`, real keys `[B, L]`, attention mask `[B, L, L]`)."""
    device = contexts.text_ids.device
    batch, longest = contexts.text_ids.shape
    segment = torch.cat(
        [
            torch.full((n + 2,), IMAGE_SEGMENT, device=device),
            torch.full((m + 2,), VIT_SEGMENT, device=device),
            torch.full((longest,), TEXT_SEGMENT, device=device),
        ]
    )
    image = contexts.has_image[:, None]
    text_slot = torch.arange(longest, device=device)[None]
    text_start = torch.where(image, 2, 0)
    positions = torch.cat(
        [
            torch.zeros(batch, n + 2, dtype=torch.long, device=device),
            torch.ones(batch, m + 2, dtype=torch.long, device=device),
            text_start + text_slot,
        ],
        dim=1,
    )
    real = torch.cat(
        [
            image.expand(batch, n + m + 4),
            text_slot < contexts.text_lengths[:, None],
        ],
        dim=1,
    )
    token = torch.arange(segment.shape[0], device=device)
    earlier = segment[None, :] < segment[:, None]
    within = (segment[None, :] == segment[:, None]) & (
        (segment[:, None] != TEXT_SEGMENT) | (token[None, :] <= token[:, None])
    )
    # An absent query sees itself, so that no row has every key masked (SDPA would give NaN,
    # and NaN times a zero weight is NaN); absent keys are never read by a real query.
    itself = torch.eye(token.shape[0], dtype=torch.bool, device=device)
    mask = (real[:, None, :] & (earlier | within)[None]) | itself[None]
    return positions, real, mask


def edit_context_kv(
    model: Bagel,
    vit: ImageContextEncoder,
    contexts: EditContexts,
    pos_ids: Tensor,
    marker_ids: Tensor,
) -> PrefixKV:
    """Each layer's K/V of every sample's context, as `ContextEncoder.prefill` computes them
    (`Bagel.prefill_mixed_layers`), with `pos_ids` the source latents' table rows."""
    batch = contexts.batch
    n, m = contexts.source_tokens.shape[1], contexts.vit_patches.shape[1]
    dtype = model.vae2llm.weight.dtype
    embed = model.language_model.model.embed_tokens
    start, end = embed(marker_ids)[:, None].expand(-1, batch, -1).unbind(0)
    start, end = start[:, None], end[:, None]
    clean = torch.zeros(1, device=pos_ids.device)
    source = (
        model.vae2llm(contexts.source_tokens.to(dtype))
        + model.time_embedder(clean)
        + model.latent_pos_embed(pos_ids)
    )
    seen = vit_tokens(vit, contexts.vit_patches, contexts.vit_ids)
    text = embed(contexts.text_ids)
    x = torch.cat([start, source.to(start.dtype), end, start, seen.to(start.dtype), end, text], 1)

    positions, real, mask = _layout(contexts, n, m)
    cos, sin = model.rope(positions)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    # The gen expert takes the source latents (slots 1..n), the und expert every other token.
    gen = slice(1, n + 1)

    def und(t: Tensor) -> Tensor:
        return torch.cat([t[:, :1], t[:, n + 1 :]], dim=1)

    def merge(u: Tensor, g: Tensor) -> Tensor:
        return torch.cat([u[:, :1], g, u[:, 1:]], dim=1)

    keys, values = [], []
    for index, layer in enumerate(model.layers):
        uq, uk, uv = layer.norm_qkv(und(x), und(cos), und(sin), UND)
        gq, gk, gv = layer.norm_qkv(x[:, gen], cos[:, gen], sin[:, gen], GEN)
        q, k, v = merge(uq, gq), merge(uk, gk), merge(uv, gv)
        keys.append(k)
        values.append(v)
        if index < len(model.layers) - 1:
            attn = masked_sdpa(q, k, v, mask)
            x = merge(
                layer.finish(und(x), und(attn), UND), layer.finish(x[:, gen], attn[:, gen], GEN)
            )
    block_positions = torch.where(contexts.has_image, 2, 0) + contexts.text_lengths
    return PrefixKV(keys, values, real, block_positions)


def edit_flow_loss(
    model: Bagel,
    vit: ImageContextEncoder,
    contexts: EditContexts,
    x0: Tensor,
    t: Tensor,
    noise: Tensor,
    pos_ids: Tensor,
    marker_ids: Tensor,
) -> Tensor:
    """BAGEL's objective for target latent tokens `x0` `[B, n, patch_dim]` after `contexts`:
    `x_t = (1 - t) x0 + t noise`, target velocity `noise - x0`; mean squared error. The input
    and the output image have the same size, so `pos_ids` serves both."""
    t_ = t[:, None, None]
    x_t = (1 - t_) * x0 + t_ * noise
    prefix = edit_context_kv(model, vit, contexts, pos_ids, marker_ids)
    v = block_velocity(model, prefix, x_t, t, pos_ids, marker_ids)
    return torch.nn.functional.mse_loss(v, noise - x0)
