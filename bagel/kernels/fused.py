"""Fused GPU kernels (Triton) for the elementwise chains of a decoder layer.

Eager PyTorch runs QK-norm plus RoPE as about ten passes over q and k (casts, the norm, the
scale, the rotate-half concatenation, two products and a sum), SwiGLU's activation as two and
RMSNorm as two, a large share of a generation forward (docs/benchmarks.md, "Figures behind
code defaults"). Each kernel here reads its inputs once and writes its output once, with the
arithmetic of the eager definitions in `bagel.network.layers` (fp32 inside, the same bf16
roundings), so results agree with eager to the last bit or within one rounding of the output.

Used only for CUDA half-precision tensors when Triton imports; the environment variable
`BAGEL_FUSED_KERNELS=0` turns them off (eager PyTorch everywhere).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bagel import envs

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: eager PyTorch only
    triton = None

_HALF = (torch.bfloat16, torch.float16)


def enabled() -> bool:
    return triton is not None and envs.switch_on(envs.FUSED_KERNELS)


def applies(x: Tensor) -> bool:
    """Whether the fused kernels serve `x`: a CUDA half-precision tensor, kernels enabled."""
    return x.is_cuda and x.dtype in _HALF and enabled()


if triton is not None:

    @triton.jit
    def _qk_norm_rope_kernel(
        x_ptr,
        w_ptr,
        cos_ptr,
        sin_ptr,
        out_ptr,
        n_rows,
        heads,
        seq,
        cos_batch_stride,
        cos_seq_stride,
        eps,
        HALF: tl.constexpr,
        BLOCK_ROWS: tl.constexpr,
    ):
        # One row is one (token, head) vector of 2 * HALF values; its halves rotate together.
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        live = (rows < n_rows)[:, None]
        cols = tl.arange(0, HALF)[None, :]
        at = rows[:, None].to(tl.int64) * (2 * HALF) + cols
        x1 = tl.load(x_ptr + at, mask=live, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + at + HALF, mask=live, other=0.0).to(tl.float32)
        mean_square = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF)
        scale = (1.0 / tl.sqrt(mean_square + eps))[:, None]
        n1 = x1 * scale * tl.load(w_ptr + cols).to(tl.float32)
        n2 = x2 * scale * tl.load(w_ptr + HALF + cols).to(tl.float32)
        token = rows // heads
        table = ((token // seq) * cos_batch_stride + (token % seq) * cos_seq_stride)[:, None] + cols
        c1 = tl.load(cos_ptr + table, mask=live, other=0.0)
        c2 = tl.load(cos_ptr + table + HALF, mask=live, other=0.0)
        s1 = tl.load(sin_ptr + table, mask=live, other=0.0)
        s2 = tl.load(sin_ptr + table + HALF, mask=live, other=0.0)
        out_ty = out_ptr.dtype.element_ty
        tl.store(out_ptr + at, (n1 * c1 - n2 * s1).to(out_ty), mask=live)
        tl.store(out_ptr + at + HALF, (n2 * c2 + n1 * s2).to(out_ty), mask=live)

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, width, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        live = cols < width
        x = tl.load(x_ptr + row * width + cols, mask=live, other=0.0).to(tl.float32)
        scale = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / width + eps)
        out_ty = out_ptr.dtype.element_ty
        # Qwen2 order: normalise, round to the input dtype, then scale by the weight.
        normed = (x * scale).to(out_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=live, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * width + cols, (normed * w).to(out_ty), mask=live)

    @triton.jit
    def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, n, width, in_row_stride, BLOCK: tl.constexpr):
        at = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = at < n
        source = (at // width) * in_row_stride + at % width
        g = tl.load(gate_ptr + source, mask=live, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + source, mask=live, other=0.0).to(tl.float32)
        out_ty = out_ptr.dtype.element_ty
        # As eager: silu rounded to the input dtype, then the product rounded.
        act = (g / (1.0 + tl.exp(-g))).to(out_ty).to(tl.float32)
        tl.store(out_ptr + at, (act * u).to(out_ty), mask=live)


def qk_norm_rope(x: Tensor, weight: Tensor, cos: Tensor, sin: Tensor, eps: float) -> Tensor:
    """Per-head RMSNorm (in fp32, scaled by `weight`) then rotate-half RoPE, rounded once.

    `x` `[B, L, H, D]`; `cos`/`sin` broadcast to `[B, L, 1, D]`. Equals
    `apply_rope(weight * rms_norm(x.float()), cos, sin).to(x.dtype)`.
    """
    batch, seq, heads, dim = x.shape
    x = x.contiguous()
    out = torch.empty_like(x)
    cos = cos.to(torch.float32).expand(batch, seq, 1, dim)
    sin = sin.to(torch.float32).expand(batch, seq, 1, dim)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    rows = batch * seq * heads
    block_rows = 16
    _qk_norm_rope_kernel[(triton.cdiv(rows, block_rows),)](
        x, weight, cos, sin, out, rows, heads, seq, cos.stride(0), cos.stride(1), eps,
        HALF=dim // 2, BLOCK_ROWS=block_rows, num_warps=4,
    )  # fmt: skip
    return out


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Qwen2 RMSNorm over the last dim: `weight * rms_norm(x)` with the eager roundings."""
    width = x.shape[-1]
    x = x.contiguous()
    out = torch.empty_like(x)
    rows = x.numel() // width if width else 0
    if rows:
        block = triton.next_power_of_2(width)
        _rms_norm_kernel[(rows,)](
            x, weight, out, width, eps, BLOCK=block, num_warps=8 if block >= 2048 else 4
        )
    return out


def _as_rows(x: Tensor, width: int) -> Tensor:
    """`x` as `[rows, width]` rows with unit column stride, viewed in place where it can be."""
    if x.stride(-1) == 1:
        try:
            return x.view(-1, width)
        except RuntimeError:  # rows not evenly spaced
            pass
    return x.contiguous().view(-1, width)


def silu_mul(gate: Tensor, up: Tensor, out: Tensor | None = None) -> Tensor:
    """`silu(gate) * up` in one pass, with the eager roundings; into `out` when given (which may
    be `gate` or `up` themselves: each element is read before it is written). `gate` and `up` may
    be column slices of one wider tensor (a packed gate/up projection's halves), read in place."""
    if out is None:
        out = gate.new_empty(gate.shape)
    elif not out.is_contiguous() or out.shape != gate.shape or out.dtype != gate.dtype:
        raise ValueError("silu_mul's out must be a contiguous tensor shaped like gate")
    n, width = gate.numel(), gate.shape[-1]
    if n:
        gate_rows, up_rows = _as_rows(gate, width), _as_rows(up, width)
        if gate_rows.stride(0) != up_rows.stride(0):
            gate_rows, up_rows = gate_rows.contiguous(), up_rows.contiguous()
        block = 2048
        _silu_mul_kernel[(triton.cdiv(n, block),)](
            gate_rows, up_rows, out, n, width, gate_rows.stride(0), BLOCK=block, num_warps=8
        )
    return out
