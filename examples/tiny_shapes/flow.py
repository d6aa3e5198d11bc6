"""The training forward and BAGEL's rectified-flow objective.

`Bagel.prefill_layers` and `Bagel.forward_block` run without gradients and take one set of latents
for all CFG branches, so training composes the same submodules itself, for a batch of samples
that each have their own prompt (right-padded, empty ones included), latents and time:

- text: the und expert, causal, over `<|im_start|> caption <|im_end|>` at RoPE positions 0..P-1,
  keeping each layer's K/V (the prefill);
- block: `[<|vision_start|>, <|vision_end|>]` by the und expert and the latent tokens by the gen
  expert, all at RoPE position P, non-causal over [prompt K/V ; markers ; latents], through each
  layer's own `forward_block`, then `velocity`.

A test holds this equal to the inference path (`BlockVelocity`) within 1e-5 in fp32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor

from bagel.network.attention import BlockQKV, full_block_attention, masked_sdpa
from bagel.network.latents import patchify
from bagel.network.model import UND, Bagel

TIMESTEP_SHIFT = 3.0  # the inference default (`GenerationParams.timestep_shift`)


@dataclasses.dataclass
class PrefixKV:
    """Each layer's context K/V `[B, L, Hkv, D]` (a prompt, or an edit's image and instruction:
    `edit_flow`), which keys are real, and the RoPE position of each sample's generation block."""

    keys: list[Tensor]
    values: list[Tensor]
    key_mask: Tensor  # [B, L] bool
    positions: Tensor  # [B] int64


def pad_prompts(prompts: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Token ids right-padded to one length `[B, P_max]` (CPU), and each prompt's length `[B]`."""
    longest = max((len(p) for p in prompts), default=0)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(list(p), dtype=torch.long)
    return ids, torch.tensor([len(p) for p in prompts], dtype=torch.long)


def text_kv(model: Bagel, ids: Tensor, lengths: Tensor) -> PrefixKV:
    """The und expert's causal pass over right-padded prompts `ids` `[B, L]` of `lengths` `[B]`
    (0 for the empty context), as `Bagel.prefill_layers` runs it; tokens past a prompt's length
    are padding, whatever their ids."""
    llm = model.config.llm
    batch, longest = ids.shape
    device = ids.device
    key_mask = torch.arange(longest, device=device)[None] < lengths[:, None]
    if longest == 0:
        empty = torch.zeros(batch, 0, llm.num_kv_heads, llm.head_dim, device=device)
        return PrefixKV([empty] * llm.num_layers, [empty] * llm.num_layers, key_mask, lengths)
    cos, sin = model.rope(torch.arange(longest, device=device))
    cos, sin = cos[:, None, :], sin[:, None, :]
    causal = torch.ones(longest, longest, dtype=torch.bool, device=device).tril()
    # A padding query also sees itself, so that a row never has every key masked (SDPA would
    # give NaN there, and NaN times a zero attention weight is NaN); its K/V are never read.
    itself = torch.eye(longest, dtype=torch.bool, device=device)
    mask = causal & (key_mask[:, None, :] | itself)
    x = model.language_model.model.embed_tokens(ids)
    keys, values = [], []
    for index, layer in enumerate(model.layers):
        q, k, v = layer.norm_qkv(x, cos, sin, UND)
        keys.append(k)
        values.append(v)
        if index < len(model.layers) - 1:
            x = layer.finish(x, masked_sdpa(q, k, v, mask), UND)
    return PrefixKV(keys, values, key_mask, lengths)


def _padded_block_attention(x: BlockQKV, joint_key_mask: Tensor) -> tuple[Tensor, Tensor]:
    return full_block_attention(dataclasses.replace(x, joint_key_mask=joint_key_mask))


def block_velocity(
    model: Bagel, prefix: PrefixKV, x_t: Tensor, t: Tensor, pos_ids: Tensor, marker_ids: Tensor
) -> Tensor:
    """Velocity `[B, n, patch_dim]` (fp32) of latent tokens `x_t` `[B, n, patch_dim]` at times `t`
    `[B]`, each sample after its own context; as `Bagel.embed_block` + `forward_layers` +
    `velocity`, with a key mask for the padded prompts."""
    batch = x_t.shape[0]
    dtype = model.vae2llm.weight.dtype
    latent = (
        model.vae2llm(x_t.to(dtype))
        + model.time_embedder(t)[:, None, :]
        + model.latent_pos_embed(pos_ids)
    )
    joint = model.language_model.model.embed_tokens(marker_ids).expand(batch, -1, -1)
    markers = prefix.key_mask.new_ones(batch, marker_ids.shape[0])
    attention = partial(
        _padded_block_attention, joint_key_mask=torch.cat([prefix.key_mask, markers], dim=1)
    )
    cos, sin = model.rope(prefix.positions)
    cos, sin = cos[:, None, None, :], sin[:, None, None, :]
    for index, layer in enumerate(model.layers):
        joint, latent = layer.forward_block(
            joint, latent, cos, sin, prefix.keys[index], prefix.values[index], None, attention
        )
    return model.velocity(latent)


def patchify_batch(z: Tensor, patch: int) -> Tensor:
    """`bagel.network.latents.patchify` over a batch: `[B, C, 2h, 2w]` -> `[B, h*w, p*p*C]`."""
    return torch.func.vmap(lambda one: patchify(one, patch))(z)


def sample_t(batch: int, generator: torch.Generator, shift: float = TIMESTEP_SHIFT) -> Tensor:
    """Flow times (on the generator's device) from a logit-normal u, shifted as the inference
    schedule is: `t = s*u / (1 + (s-1)*u)`."""
    u = torch.sigmoid(torch.randn(batch, generator=generator, device=generator.device))
    return shift * u / (1 + (shift - 1) * u)


def flow_loss(
    model: Bagel,
    ids: Tensor,
    lengths: Tensor,
    x0: Tensor,
    t: Tensor,
    noise: Tensor,
    pos_ids: Tensor,
    marker_ids: Tensor,
) -> Tensor:
    """BAGEL's objective for latent tokens `x0` `[B, n, patch_dim]` after prompts `ids`/`lengths`:
    `x_t = (1 - t) x0 + t noise`, target velocity `noise - x0` (the sampler integrates
    `x <- x - v dt` from t=1 to 0); mean squared error."""
    t_ = t[:, None, None]
    x_t = (1 - t_) * x0 + t_ * noise
    text = text_kv(model, ids, lengths)
    v = block_velocity(model, text, x_t, t, pos_ids, marker_ids)
    return torch.nn.functional.mse_loss(v, noise - x0)
