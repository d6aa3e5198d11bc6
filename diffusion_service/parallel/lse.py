"""Attention over one key block that also returns its log-sum-exp, and the fp32 merge of blocks.

Ring attention sees a query's keys one block at a time; this is the one place that knows how to
attend to a block with its LSE and how to fold two partial results into one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_FUSED_DTYPES = (torch.bfloat16, torch.float16)


def attention_with_lse(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Attend `q [B, Lq, H, D]` to one key block `k, v [B, Lk, Hkv, D]`.

    Returns `out [B, Lq, H, D]` and `lse [B, Lq, H]`, both fp32, with the conventions of
    `bagel.attention` (non-causal, scale `1/sqrt(D)`, contiguous GQA head groups, `key_mask [B, Lk]`
    True for a real key). A query with no real key gets `out = 0`, `lse = -inf`, which
    `merge_attention` treats as "saw nothing".
    """
    batch, q_len, heads, _ = q.shape
    if k.shape[1] == 0:
        return (
            q.new_zeros(q.shape, dtype=torch.float32),
            q.new_full((batch, q_len, heads), float("-inf"), dtype=torch.float32),
        )
    if _fused_applies(q, key_mask):
        return _flash_attention_with_lse(q, k, v)
    return _explicit_attention_with_lse(q, k, v, key_mask)


def merge_attention(
    out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor
) -> tuple[Tensor, Tensor]:
    """Combine two partial attentions of the same queries over disjoint key sets, in fp32.

    `out`, `block_out` `[B, L, H, D]`; `lse`, `block_lse` `[B, L, H]`. The block's share of the
    merged softmax mass is `sigmoid(block_lse - lse)`, which never overflows; where both sides
    are -inf (no real key seen yet) that is NaN and becomes 0, so the row stays at zero output
    and -inf LSE. One `lerp` over the big tensor keeps the merge to two passes over memory.
    """
    lse, block_lse = lse.float(), block_lse.float()
    merged_lse = torch.logaddexp(lse, block_lse)
    block_share = torch.sigmoid(block_lse - lse).nan_to_num_(0.0)
    merged = torch.lerp(out.float(), block_out.float(), block_share.unsqueeze(-1))
    return merged, merged_lse


def _fused_applies(q: Tensor, key_mask: Tensor | None) -> bool:
    # The flash kernel takes no mask and only half precision; callers keep masks off the hot
    # path by slicing pad keys away instead of masking them.
    head_dim = q.shape[-1]
    return (
        q.device.type == "cuda"
        and key_mask is None
        and q.dtype in _FUSED_DTYPES
        and head_dim % 8 == 0
        and head_dim <= 256
    )


def _flash_attention_with_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    # The aten op works on [B, H, L, D], takes GQA KV heads as they are (checked on H100, torch
    # 2.11) and returns the fp32 LSE as [B, H, Lq].
    k, v = k.to(q.dtype), v.to(q.dtype)
    result = torch.ops.aten._scaled_dot_product_flash_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, False, False
    )
    out, lse = result[0], result[1]
    return out.transpose(1, 2).float(), lse.transpose(1, 2).float()


def _explicit_attention_with_lse(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    # Query heads viewed as [Hkv, G] so each KV head serves its group without being copied.
    qf = q.float().unflatten(2, (kv_heads, group)) * (1.0 / math.sqrt(head_dim))
    scores = torch.einsum("bqkgd,bskd->bkgqs", qf, k.float())
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # A fully masked row has lse = -inf; shifting by 0 there makes every weight exp(-inf) = 0.
    shift = lse.masked_fill(lse == float("-inf"), 0.0)
    probs = torch.exp(scores - shift.unsqueeze(-1))
    out = torch.einsum("bkgqs,bskd->bqkgd", probs, v.float()).reshape(batch, q_len, heads, head_dim)
    return out, lse.permute(0, 3, 1, 2).reshape(batch, q_len, heads)
