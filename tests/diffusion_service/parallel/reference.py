"""A plain fp64 attention and deterministic inputs for the sequence-parallel tests.

Written independently of `diffusion_service.parallel` so it can serve as the oracle; only the
input container, `BlockQKV`, is shared with the code under test.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bagel.network.attention import BlockQKV

HEADS, KV_HEADS, HEAD_DIM = 8, 4, 16
MARKERS = 2


def reference_attention(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """fp64 softmax attention; returns out `[B, Lq, H, D]` and lse `[B, Lq, H]`."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return out, lse.transpose(1, 2)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """Max abs error over the max abs of the reference."""
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def block_reference(x: BlockQKV) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """fp64 (joint_out, latent_out, joint_lse, latent_lse) of a whole block (all latents)."""
    q = torch.cat([x.joint_q, x.latent_q], dim=1)
    k = torch.cat([x.joint_k, x.latent_k], dim=1)
    v = torch.cat([x.joint_v, x.latent_v], dim=1)
    mask = None
    if x.joint_key_mask is not None:
        ones = torch.ones(k.shape[0], x.latent_k.shape[1], dtype=torch.bool)
        mask = torch.cat([x.joint_key_mask, ones], dim=1)
    out, lse = reference_attention(q, k, v, mask)
    j = x.joint_q.shape[1]
    return out[:, :j], out[:, j:], lse[:, :j], lse[:, j:]


def make_block_inputs(
    seed: int, prefix_lens: tuple[int, ...], num_latent: int, dtype: torch.dtype = torch.float32
) -> BlockQKV:
    """Inputs of one generation block, the whole latent sequence (`num_latent` tokens); batch row
    b has a prompt prefix of `prefix_lens[b]` keys.

    Prefixes are right-padded to the longest and followed by the marker keys, as the model
    lays them out; the mask is None when all prefixes have the same length.
    """
    gen = torch.Generator().manual_seed(seed)
    batch = len(prefix_lens)
    prefix = max(prefix_lens)
    joint_len = prefix + MARKERS

    def randn(length: int, heads: int) -> Tensor:
        return torch.randn(batch, length, heads, HEAD_DIM, generator=gen).to(dtype)

    mask = None
    if len(set(prefix_lens)) > 1:
        mask = torch.ones(batch, joint_len, dtype=torch.bool)
        for b, n in enumerate(prefix_lens):
            mask[b, n:prefix] = False
    return BlockQKV(
        joint_q=randn(MARKERS, HEADS),
        joint_k=randn(joint_len, KV_HEADS),
        joint_v=randn(joint_len, KV_HEADS),
        joint_key_mask=mask,
        latent_q=randn(num_latent, HEADS),
        latent_k=randn(num_latent, KV_HEADS),
        latent_v=randn(num_latent, KV_HEADS),
    )


def with_garbage_pad(x: Tensor, padded_len: int, seed: int) -> Tensor:
    """`x` padded along dim 1 with large random values: a pad key that leaks shows up loudly."""
    gen = torch.Generator().manual_seed(seed)
    shape = list(x.shape)
    shape[1] = padded_len - x.shape[1]
    return torch.cat([x, 50 * torch.randn(shape, generator=gen).to(x.dtype)], dim=1)
