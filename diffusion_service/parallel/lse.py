"""Attention over one key block that also returns its log-sum-exp, and the fp32 merge of blocks.

Ring attention sees a query's keys one block at a time; this is the one place that knows how to
attend to a block with its LSE and how to fold two partial results into one. On CPU (and for
fp32) the LSE is computed explicitly with fp32 accumulation; on CUDA in bf16/fp16 a fused kernel
returns it (cuDNN where available, else the flash op, which takes no mask). In "fp8" precision
the block is attended by the FP8 attention (`bagel.network.attention.fp8_attention_with_lse`),
which quantizes each block it is given on its own: Ring merges per-block-quantized partials.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bagel.network.attention import AttentionPrecision, fp8_attention_with_lse

_FUSED_DTYPES = (torch.bfloat16, torch.float16)


def attention_with_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_mask: Tensor | None = None,
    precision: AttentionPrecision = "bf16",
) -> tuple[Tensor, Tensor]:
    """Attend `q [B, Lq, H, D]` to one key block `k, v [B, Lk, Hkv, D]`.

    Returns `out [B, Lq, H, D]` and `lse [B, Lq, H]`, both fp32, with the conventions of
    `bagel.network.attention` (non-causal, scale `1/sqrt(D)`, contiguous GQA head groups,
    `key_mask [B, Lk]` True for a real key). A query with no real key gets `out = 0`, `lse = -inf`,
    which `merge_attention` treats as "saw nothing".
    """
    batch, q_len, heads, _ = q.shape
    if k.shape[1] == 0:
        return (
            q.new_zeros(q.shape, dtype=torch.float32),
            q.new_full((batch, q_len, heads), float("-inf"), dtype=torch.float32),
        )
    if precision == "fp8":
        out, lse = fp8_attention_with_lse(q, k, v, key_mask)
        return out.float(), lse
    if _fused_applies(q):
        return _fused_attention_with_lse(q, k, v, key_mask)
    return _explicit_attention_with_lse(q, k, v, key_mask)


def merge_attention(
    out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor
) -> tuple[Tensor, Tensor]:
    """Combine two partial attentions of the same queries over disjoint key sets, in fp32.

    `out`, `block_out` `[B, L, H, D]`; `lse`, `block_lse` `[B, L, H]`. The block's share of the
    merged softmax mass is `sigmoid(block_lse - lse)`, which never overflows; where both sides
    are -inf (no real key seen yet) that is NaN and becomes 0, so the row stays at zero output
    and -inf LSE. One `lerp` does the weighted sum over the big tensor in a single pass.
    """
    lse, block_lse = lse.float(), block_lse.float()
    merged_lse = torch.logaddexp(lse, block_lse)
    block_share = torch.sigmoid(block_lse - lse).nan_to_num_(0.0)
    merged = torch.lerp(out.float(), block_out.float(), block_share.unsqueeze(-1))
    return merged, merged_lse


def _fused_applies(q: Tensor) -> bool:
    # The fused kernels take half precision only and head dims up to 128 on every GPU we target.
    head_dim = q.shape[-1]
    return (
        q.device.type == "cuda"
        and q.dtype in _FUSED_DTYPES
        and head_dim % 8 == 0
        and head_dim <= 128
    )


def _use_cudnn(q: Tensor) -> bool:
    # cuDNN's Hopper kernel is faster than the FlashAttention-2 kernel behind the flash op
    # (docs/benchmarks.md, "Figures behind code defaults"). cuDNN needs sm80+ and can be disabled.
    return (
        torch.backends.cudnn.is_available()
        and torch.backends.cuda.cudnn_sdp_enabled()
        and torch.cuda.get_device_capability(q.device) >= (8, 0)
    )


def _fused_attention_with_lse(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    # Both aten ops work on [B, H, L, D] views of our [B, L, H, D] tensors, take GQA KV heads as
    # they are and return an fp32 LSE laid out [B, H, Lq(, 1)].
    batch, q_len, heads, _ = q.shape
    cudnn = _use_cudnn(q)
    if key_mask is not None and not cudnn:
        return _explicit_attention_with_lse(q, k, v, key_mask)
    qt, kt, vt = q.transpose(1, 2), k.to(q.dtype).transpose(1, 2), v.to(q.dtype).transpose(1, 2)
    if not cudnn:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt)[:2]
        return out.transpose(1, 2).float(), lse.transpose(1, 2).float()
    bias = None
    if key_mask is not None:
        # cuDNN takes the mask as an additive bias, broadcast over heads and queries for free.
        bias = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill_(~key_mask, float("-inf"))[:, None, None, :]
        bias = bias.expand(batch, heads, q_len, key_mask.shape[1])
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, bias, True)[:2]
    out, lse = out.transpose(1, 2).float(), lse.reshape(batch, heads, q_len).transpose(1, 2)
    if key_mask is not None:
        # A row with no real key would be NaN from the kernel; give it the "saw nothing" form.
        empty = ~key_mask.any(dim=1)[:, None, None]
        out = out.masked_fill(empty[..., None], 0.0)
        lse = lse.masked_fill(empty, float("-inf"))
    return out, lse.float()


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
