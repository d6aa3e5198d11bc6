"""The fused kernel of a text-decoding step's attention input (Triton).

A decoding step feeds one token per request, so each layer's q/k/v are a few vectors and its
cost is launches, not arithmetic: eager PyTorch spends six kernels per layer between the q/k/v
projection and attention (two copies out of the packed projection, QK-norm + RoPE of q and of
k, and two indexed writes of k and v into the cache). `qkv_into_cache` does all of it in one:
it reads the packed projection once, writes q normed and rotated, and writes each request's new
key (normed and rotated) and value into its cache slot at its own length. The arithmetic is
`bagel.kernels.fused.qk_norm_rope`'s, so the values written are the same.
"""

from __future__ import annotations

from torch import Tensor

from bagel.kernels import fused

if fused.triton is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _norm_rope(x1, x2, w_ptr, eps, cos_ptr, sin_ptr, row, cols, HALF: tl.constexpr):
        """One head's halves RMSNormed in fp32 and rotated: `_qk_norm_rope_kernel`'s arithmetic."""
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        mean_square = (tl.sum(a * a, axis=0) + tl.sum(b * b, axis=0)) / (2 * HALF)
        scale = 1.0 / tl.sqrt(mean_square + eps)
        n1 = a * scale * tl.load(w_ptr + cols).to(tl.float32)
        n2 = b * scale * tl.load(w_ptr + HALF + cols).to(tl.float32)
        table = row * (2 * HALF) + cols
        c1, c2 = tl.load(cos_ptr + table), tl.load(cos_ptr + table + HALF)
        s1, s2 = tl.load(sin_ptr + table), tl.load(sin_ptr + table + HALF)
        return (n1 * c1 - n2 * s1).to(x1.dtype), (n2 * c2 + n1 * s2).to(x1.dtype)

    @triton.jit
    def _qkv_into_cache_kernel(
        qkv_ptr,
        q_weight_ptr,
        k_weight_ptr,
        cos_ptr,
        sin_ptr,
        lengths_ptr,
        q_ptr,
        keys_ptr,
        values_ptr,
        qkv_row_stride,
        cache_slot_stride,
        cache_head_stride,
        eps_q,
        eps_k,
        HEADS: tl.constexpr,
        KV_HEADS: tl.constexpr,
        HALF: tl.constexpr,
    ):
        # Program (row, head): heads [0, HEADS) are q's, then KV_HEADS of k, then KV_HEADS of v.
        row = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        cols = tl.arange(0, HALF)
        source = qkv_ptr + row * qkv_row_stride + head * (2 * HALF) + cols
        x1 = tl.load(source)
        x2 = tl.load(source + HALF)
        # The new key's place in the slot: `[row, kv head, lengths[row]]`.
        cached = row * cache_slot_stride + tl.load(lengths_ptr + row).to(tl.int64) * (2 * HALF)
        if head < HEADS:
            r1, r2 = _norm_rope(x1, x2, q_weight_ptr, eps_q, cos_ptr, sin_ptr, row, cols, HALF)
            target = q_ptr + (row * HEADS + head) * (2 * HALF) + cols
            tl.store(target, r1)
            tl.store(target + HALF, r2)
        elif head < HEADS + KV_HEADS:
            r1, r2 = _norm_rope(x1, x2, k_weight_ptr, eps_k, cos_ptr, sin_ptr, row, cols, HALF)
            target = keys_ptr + cached + (head - HEADS) * cache_head_stride + cols
            tl.store(target, r1)
            tl.store(target + HALF, r2)
        else:
            target = values_ptr + cached + (head - HEADS - KV_HEADS) * cache_head_stride + cols
            tl.store(target, x1)
            tl.store(target + HALF, x2)


def qkv_into_cache(
    qkv: Tensor,
    q_norm: tuple[Tensor, float],
    k_norm: tuple[Tensor, float],
    cos: Tensor,
    sin: Tensor,
    keys: Tensor,
    values: Tensor,
    lengths: Tensor,
    heads: int,
) -> Tensor:
    """From the packed projection `qkv` `[rows, (heads + 2 kv_heads) * D]` (one token per row):
    q per-head RMSNormed (`q_norm`: weight, eps) and rotated, returned `[rows, heads, D]`; k
    normed (`k_norm`) and rotated, and v as it is, written into `keys`/`values`
    `[slots, kv_heads, capacity, D]` at `[row, :, lengths[row]]`. `cos`/`sin` hold one fp32
    table row per row (`[rows, ..., D]`, contiguous)."""
    rows = qkv.shape[0]
    kv_heads, dim = keys.shape[1], keys.shape[3]
    if qkv.stride(-1) != 1 or keys.stride()[1:] != values.stride()[1:] or keys.stride(-1) != 1:
        raise ValueError("qkv_into_cache needs row-major qkv and caches of one layout")
    if keys.stride(2) != dim or not (cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError("qkv_into_cache needs contiguous cache rows and tables")
    q = qkv.new_empty(rows, heads, dim)
    if rows:
        _qkv_into_cache_kernel[(rows, heads + 2 * kv_heads)](
            qkv, q_norm[0], k_norm[0], cos, sin, lengths, q, keys, values,
            qkv.stride(0), keys.stride(0), keys.stride(1), q_norm[1], k_norm[1],
            HEADS=heads, KV_HEADS=kv_heads, HALF=dim // 2, num_warps=1,
        )  # fmt: skip
    return q
