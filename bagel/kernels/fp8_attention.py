"""FP8 (e4m3) flash attention for Hopper, with the log-sum-exp that sequence-parallel merges need.

PyTorch's SDPA has no FP8 kernel, so this is a Triton one. The quantization, which the
plain-PyTorch reference `fp8_attention_reference` here repeats operation for operation:
- Q: one fp32 scale per (batch, head, block of `block_m` query rows), 128 by default, computed
  inside the attention kernel from the bf16 tile it loads (no separate pass over Q);
- K: one fp32 scale per (batch, KV head, block of `K_BLOCK` = 128 keys), by a quantize pass that
  runs once per call, so the 7 query heads of a GQA group read one e4m3 copy of their KV head;
- V (when P·V runs in FP8): one fp32 scale per (batch, KV head, channel) over all keys, stored
  transposed (keys contiguous), the layout Hopper's FP8 tensor cores take for the right operand;
- P (when P·V runs in FP8): `exp(s - running max)` lies in [0, 1] and is stored as `P * 256` in
  e4m3; a power of two changes no rounding, and it keeps probabilities down to 2^-17 out of the
  range e4m3 flushes to zero. The row sums are taken over the fp32 P.
Every scale is `amax / 448` and every value `round(x * (448 / amax))`, the largest magnitude of a
block landing on +-448, as `bagel.network.fp8` quantizes activations.

Shapes and conventions are those of `bagel.network.attention`: q `[B, Lq, H, D]`, k/v
`[B, Lk, Hkv, D]` (query head `h` reads KV head `h // (H // Hkv)`, no copies), non-causal,
scale `1/sqrt(D)`, `key_mask [B, Lk]` True for a real key. The output is `[B, Lq, H, D]` in q's
dtype and the LSE `[B, Lq, H]` fp32 (natural log), as `diffusion_service.parallel.lse` lays them
out; a query with no real key gets output 0 and LSE -inf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from bagel.kernels.fused_fp8 import AMAX_FLOOR, FP8, FP8_MAX

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference only
    triton = None

K_BLOCK = 128  # keys sharing one K scale
P_SCALE = 256.0  # P in [0, 1] is stored as P * P_SCALE in e4m3
LOG2E = 1.4426950408889634
_HALF = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration of the attention kernel. `block_m` is also the Q scale block;
    `block_n` must divide `K_BLOCK` so that a key tile never straddles two K scales."""

    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 2


# The configurations the benchmark times; DEFAULT_CONFIG is what a call without one gets.
CONFIGS = {
    "m128-n128-w8-s2": KernelConfig(128, 128, 8, 2),
    "m128-n64-w4-s3": KernelConfig(128, 64, 4, 3),
    "m128-n128-w4-s3": KernelConfig(128, 128, 4, 3),
    "m128-n64-w8-s3": KernelConfig(128, 64, 8, 3),
    "m64-n128-w4-s3": KernelConfig(64, 128, 4, 3),
}
DEFAULT_CONFIG = CONFIGS["m128-n128-w8-s2"]


# ---- plain-PyTorch reference ----------------------------------------------------------------


def quantize_blocks(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """`x [B, L, H, D]` -> e4m3 data `[B, L, H, D]` and fp32 scales `[B, H, ceil(L / block)]`:
    one scale per (batch, head, block of `block` rows along L)."""
    batch, length, heads, dim = x.shape
    blocks = -(-length // block)
    padded = F.pad(x.float(), (0, 0, 0, 0, 0, blocks * block - length))
    grouped = padded.view(batch, blocks, block, heads, dim)
    amax = grouped.abs().amax(dim=(2, 4), keepdim=True).clamp_min(AMAX_FLOOR)
    # Tensor over tensor: one IEEE division, as the kernels' `div_rn`.
    limit = torch.full_like(amax, FP8_MAX)
    data = (grouped * (limit / amax)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    data = data.view(batch, blocks * block, heads, dim)[:, :length]
    return data, (amax / limit).view(batch, blocks, heads).transpose(1, 2)


def quantize_channels(x: Tensor) -> tuple[Tensor, Tensor]:
    """`x [B, L, H, D]` -> e4m3 data `[B, L, H, D]` and fp32 scales `[B, H, D]`: one scale per
    (batch, head, channel) over all of L."""
    xf = x.float()
    amax = xf.abs().amax(dim=1, keepdim=True).clamp_min(AMAX_FLOOR)
    limit = torch.full_like(amax, FP8_MAX)
    data = (xf * (limit / amax)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return data, (amax / limit).squeeze(1)


def _dequantize_blocks(data: Tensor, scale: Tensor, block: int) -> Tensor:
    per_row = scale.transpose(1, 2).repeat_interleave(block, dim=1)[:, : data.shape[1]]
    return data.float() * per_row[..., None]


def fp8_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_mask: Tensor | None = None,
    *,
    pv_fp8: bool = True,
    block_m: int = DEFAULT_CONFIG.block_m,
    block_n: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The kernel's quantization, dequantized, then attention in fp32: `(out fp32 [B, Lq, H, D],
    lse fp32 [B, Lq, H])`, the LSE being the log-sum-exp of the quantized scores.

    P is rounded (to e4m3 times `P_SCALE` when `pv_fp8`, else to q's dtype, as the kernel feeds
    it to the P·V product) relative to the running row maximum of the kernel's loop over key
    tiles of `block_n`; `None` takes the whole row as one tile (the final maximum).
    """
    batch, q_len, heads, dim = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    qd = _dequantize_blocks(*quantize_blocks(q, block_m), block_m)
    kd = _dequantize_blocks(*quantize_blocks(k, K_BLOCK), K_BLOCK)
    if pv_fp8:
        v8, v_scale = quantize_channels(v)
        vd = v8.float() * v_scale[:, None]
    else:
        vd = v.float()
    # [B, Hkv, G, Lq, Lk]: each KV head serves its query group without being copied.
    qg = qd.unflatten(2, (kv_heads, group)) * (1.0 / math.sqrt(dim))
    scores = torch.einsum("bqkgd,bskd->bkgqs", qg, kd)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    final = torch.where(lse == float("-inf"), 0.0, scores.amax(dim=-1))
    # The running maximum at each key: the maximum over the key tiles up to its own.
    tile = k_len if block_n is None else block_n
    tiles = -(-k_len // tile)
    padded = F.pad(scores, (0, tiles * tile - k_len), value=float("-inf"))
    running = padded.unflatten(-1, (tiles, tile)).amax(dim=-1).cummax(dim=-1).values
    running = running.repeat_interleave(tile, dim=-1)[..., :k_len]
    shift = running.masked_fill(running == float("-inf"), 0.0)
    p = torch.exp(scores - shift)
    rounded = (p * P_SCALE).to(FP8).float() / P_SCALE if pv_fp8 else p.to(q.dtype).float()
    weights = torch.where(p > 0, rounded * torch.exp(shift - final[..., None]), 0.0)
    total = torch.exp(scores - final[..., None]).sum(dim=-1)
    out = (
        torch.einsum("bkgqs,bskd->bqkgd", weights, vd)
        / total.clamp_min(torch.finfo(torch.float32).tiny).permute(0, 3, 1, 2)[..., None]
    )
    out = out.reshape(batch, q_len, heads, dim)
    return out, lse.permute(0, 3, 1, 2).reshape(batch, q_len, heads)


# ---- Triton kernels -------------------------------------------------------------------------


if triton is not None:

    @triton.jit
    def _quantize_kv_kernel(
        k_ptr, v_ptr, v_amax_ptr, k8_ptr, k_scale_ptr, v8_ptr, v_scale_ptr,
        k_len, kv_heads, k_blocks, v8_row_stride,
        stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh,
        HEAD_DIM: tl.constexpr, K_BLOCK: tl.constexpr, QUANTIZE_V: tl.constexpr,
        FP8_MAX: tl.constexpr, AMAX_FLOOR: tl.constexpr,
    ):  # fmt: skip
        # One program per (batch, KV head, block of K_BLOCK keys): K gets the block's scale; V,
        # whose per-channel amax over all keys is given, is written transposed [D, keys].
        blk = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // kv_heads).to(tl.int64)
        h = bh % kv_heads
        rows = blk * K_BLOCK + tl.arange(0, K_BLOCK)
        cols = tl.arange(0, HEAD_DIM)
        live = (rows < k_len)[:, None]
        at = b * stride_kb + h * stride_kh + rows[:, None] * stride_kl + cols[None, :]
        x = tl.load(k_ptr + at, mask=live, other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0), AMAX_FLOOR)
        x8 = tl.clamp(x * tl.div_rn(FP8_MAX, amax), -FP8_MAX, FP8_MAX)
        out_at = bh.to(tl.int64) * k_len * HEAD_DIM + rows[:, None] * HEAD_DIM + cols[None, :]
        tl.store(k8_ptr + out_at, x8.to(k8_ptr.dtype.element_ty), mask=live)
        tl.store(k_scale_ptr + bh * k_blocks + blk, tl.div_rn(amax, FP8_MAX))
        if QUANTIZE_V:
            at = b * stride_vb + h * stride_vh + rows[:, None] * stride_vl + cols[None, :]
            y = tl.load(v_ptr + at, mask=live, other=0.0).to(tl.float32)
            v_amax = tl.maximum(tl.load(v_amax_ptr + bh * HEAD_DIM + cols), AMAX_FLOOR)
            y8 = tl.clamp(y * tl.div_rn(FP8_MAX, v_amax)[None, :], -FP8_MAX, FP8_MAX)
            base = bh.to(tl.int64) * HEAD_DIM * v8_row_stride
            v8_at = base + cols[None, :] * v8_row_stride + rows[:, None]
            tl.store(v8_ptr + v8_at, y8.to(v8_ptr.dtype.element_ty), mask=live)
            if blk == 0:
                tl.store(v_scale_ptr + bh * HEAD_DIM + cols, tl.div_rn(v_amax, FP8_MAX))

    @triton.jit
    def _attention_kernel(
        q_ptr, k8_ptr, k_scale_ptr, v_ptr, v_scale_ptr, mask_ptr, out_ptr, lse_ptr,
        q_len, k_len, heads, group, kv_heads, k_blocks, qk_scale,
        stride_qb, stride_ql, stride_qh,
        stride_vb, stride_vh, stride_vl, stride_vd,
        stride_mb,
        stride_ob, stride_ol, stride_oh,
        stride_lb, stride_ll, stride_lh,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        K_BLOCK: tl.constexpr, PV_FP8: tl.constexpr, HAS_MASK: tl.constexpr,
        FP8_MAX: tl.constexpr, AMAX_FLOOR: tl.constexpr, P_SCALE: tl.constexpr,
    ):  # fmt: skip
        # One program per (block of BLOCK_M queries, batch * head). Scores are kept in log2 units
        # (`qk_scale` is 1/sqrt(D) * log2(e)) so that exp2 is the exponential.
        start_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // heads).to(tl.int64)
        h = bh % heads
        hkv = h // group
        kv = b * kv_heads + hkv  # the flat (batch, KV head) index of this head's KV head
        rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, HEAD_DIM)
        keys = tl.arange(0, BLOCK_N)
        row_live = rows < q_len

        q_at = b * stride_qb + h * stride_qh + rows[:, None] * stride_ql + dims[None, :]
        q = tl.load(q_ptr + q_at, mask=row_live[:, None], other=0.0).to(tl.float32)
        q_amax = tl.maximum(tl.max(tl.max(tl.abs(q), axis=1), axis=0), AMAX_FLOOR)
        q8 = tl.clamp(q * tl.div_rn(FP8_MAX, q_amax), -FP8_MAX, FP8_MAX).to(tl.float8e4nv)
        q_dequant = tl.div_rn(q_amax, FP8_MAX) * qk_scale

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        k_base = k8_ptr + kv * k_len * HEAD_DIM
        v_base = v_ptr + b * stride_vb + hkv * stride_vh
        for start_n in range(0, k_len, BLOCK_N):
            cols = start_n + keys
            col_live = cols < k_len
            # K^T tile [D, BLOCK_N], D contiguous: the K-major right operand of the FP8 dot.
            kt = tl.load(
                k_base + cols[None, :] * HEAD_DIM + dims[:, None],
                mask=col_live[None, :],
                other=0.0,
            )
            k_scale = tl.load(k_scale_ptr + kv * k_blocks + start_n // K_BLOCK)
            s = tl.dot(q8, kt) * (q_dequant * k_scale)
            live = col_live
            if HAS_MASK:
                real = tl.load(mask_ptr + b * stride_mb + cols, mask=col_live, other=0)
                live = live & (real != 0)
            s = tl.where(live[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # A row with no real key yet keeps shifting by 0: every weight stays exp2(-inf) = 0.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - shift[:, None])
            alpha = tl.exp2(m_i - shift)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v_at = v_base + cols[:, None] * stride_vl + dims[None, :] * stride_vd
            v = tl.load(v_at, mask=col_live[:, None], other=0.0)
            if PV_FP8:
                # A fresh product per tile, added in fp32: Hopper's FP8 tensor cores keep their
                # own partial sums at reduced precision, which must not run over all the keys.
                p8 = (p * P_SCALE).to(tl.float8e4nv)
                acc = acc * alpha[:, None] + tl.dot(p8, v)
            else:
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new

        seen = l_i > 0.0
        l_safe = tl.where(seen, l_i, 1.0)
        if PV_FP8:
            v_scale = tl.load(v_scale_ptr + kv * HEAD_DIM + dims)
            out = acc * (v_scale / P_SCALE)[None, :] / l_safe[:, None]
        else:
            out = acc / l_safe[:, None]
        o_at = b * stride_ob + h * stride_oh + rows[:, None] * stride_ol + dims[None, :]
        tl.store(out_ptr + o_at, out.to(out_ptr.dtype.element_ty), mask=row_live[:, None])
        lse = tl.where(seen, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(lse_ptr + b * stride_lb + h * stride_lh + rows * stride_ll, lse, mask=row_live)


# ---- dispatch --------------------------------------------------------------------------------


def available() -> bool:
    """Whether the Triton kernels can run here: Triton imports and a GPU with FP8 tensor cores."""
    return (
        triton is not None
        and torch.cuda.is_available()
        and torch.cuda.get_device_capability() >= (8, 9)
    )


def _check(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, config: KernelConfig) -> None:
    if not (q.is_cuda and q.dtype in _HALF and k.dtype == q.dtype and v.dtype == q.dtype):
        raise ValueError("fp8_attention takes CUDA bf16/fp16 q, k, v of one dtype")
    batch, _, heads, dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != dim or heads % k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} do not match")
    if dim not in (64, 128):
        raise ValueError(f"fp8_attention takes head dims 64 and 128, not {dim}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k, v must be contiguous along the head dim")
    if key_mask is not None and (
        key_mask.dtype != torch.bool or key_mask.shape != k.shape[:2] or key_mask.device != q.device
    ):
        raise ValueError(f"key_mask must be bool {tuple(k.shape[:2])} on q's device")
    if k.device != q.device or v.device != q.device:
        raise ValueError("q, k, v must be on one device")
    if K_BLOCK % config.block_n or config.block_n < 32:
        raise ValueError(f"block_n {config.block_n} must be at least 32 and divide {K_BLOCK}")


@dataclass(frozen=True)
class QuantizedKV:
    """K (and V, when P·V runs in FP8) as the attention kernel reads them."""

    k: Tensor  # [B, Hkv, Lk, D] e4m3
    k_scale: Tensor  # [B, Hkv, ceil(Lk / K_BLOCK)] fp32
    v: Tensor  # e4m3 [B, Hkv, D, Lk rounded up to 16] (keys contiguous), or the input's V
    v_scale: Tensor | None  # [B, Hkv, D] fp32; None when V is the input's, unquantized

    def v_strides(self) -> tuple[int, int, int, int]:
        """Strides of V over (batch, KV head, key, channel)."""
        v = self.v
        if self.v_scale is None:  # [B, Lk, Hkv, D]
            return v.stride(0), v.stride(2), v.stride(1), v.stride(3)
        return v.stride(0), v.stride(1), v.stride(3), v.stride(2)


def quantize_kv(k: Tensor, v: Tensor, pv_fp8: bool = True) -> QuantizedKV:
    """K per (batch, KV head, block of `K_BLOCK` keys) and, when `pv_fp8`, V per (batch, KV head,
    channel), in one pass over both (plus V's amax). CUDA only, as `fp8_attention`."""
    batch, k_len, kv_heads, dim = k.shape
    device = k.device
    k_blocks = triton.cdiv(k_len, K_BLOCK)
    k8 = torch.empty((batch, kv_heads, k_len, dim), dtype=FP8, device=device)
    k_scale = torch.empty((batch, kv_heads, k_blocks), dtype=torch.float32, device=device)
    if pv_fp8:
        # Keys contiguous, each row 16-byte aligned; the pad columns are never read.
        v8_row = triton.cdiv(k_len, 16) * 16
        v_amax = v.abs().amax(dim=1).float().contiguous()  # [B, Hkv, D]
        v8 = torch.empty((batch, kv_heads, dim, v8_row), dtype=FP8, device=device)
        v_scale = torch.empty((batch, kv_heads, dim), dtype=torch.float32, device=device)
    else:
        v8_row, v_amax, v8, v_scale = 0, k_scale, k8, k_scale  # unread placeholders
    if k_len and batch:
        _quantize_kv_kernel[(k_blocks, batch * kv_heads)](
            k, v, v_amax, k8, k_scale, v8, v_scale,
            k_len, kv_heads, k_blocks, v8_row,
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            HEAD_DIM=dim, K_BLOCK=K_BLOCK, QUANTIZE_V=pv_fp8,
            FP8_MAX=FP8_MAX, AMAX_FLOOR=AMAX_FLOOR, num_warps=8,
        )  # fmt: skip
    if pv_fp8:
        return QuantizedKV(k8, k_scale, v8, v_scale)
    return QuantizedKV(k8, k_scale, v, None)


def fp8_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_mask: Tensor | None = None,
    *,
    pv_fp8: bool = True,
    config: KernelConfig = DEFAULT_CONFIG,
) -> tuple[Tensor, Tensor]:
    """Attention with Q·K^T in FP8 (and P·V too when `pv_fp8`, else in q's dtype): `(out
    [B, Lq, H, D] in q's dtype, lse [B, Lq, H] fp32)`. CUDA only (`available()`); the same
    arithmetic on any device is `fp8_attention_reference`."""
    _check(q, k, v, key_mask, config)
    batch, q_len, heads, dim = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, q_len, heads), dtype=torch.float32, device=q.device)
    if k_len == 0 or q_len == 0 or batch == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    kv = quantize_kv(k, v, pv_fp8)
    # A bool tensor is one byte per element: read it as uint8, no copy.
    mask = key_mask.contiguous().view(torch.uint8) if key_mask is not None else kv.k_scale
    grid = (triton.cdiv(q_len, config.block_m), batch * heads)
    _attention_kernel[grid](
        q, kv.k, kv.k_scale, kv.v, kv.k_scale if kv.v_scale is None else kv.v_scale, mask, out,
        lse, q_len, k_len, heads, heads // kv_heads, kv_heads, kv.k_scale.shape[2],
        LOG2E / math.sqrt(dim),
        q.stride(0), q.stride(1), q.stride(2),
        *kv.v_strides(),
        mask.stride(0) if key_mask is not None else 0,
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        HEAD_DIM=dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n, K_BLOCK=K_BLOCK,
        PV_FP8=pv_fp8, HAS_MASK=key_mask is not None,
        FP8_MAX=FP8_MAX, AMAX_FLOOR=AMAX_FLOOR, P_SCALE=P_SCALE,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out, lse
