"""Triton kernels of the FP8 linear layers (`bagel.network.fp8`): activations quantized where they
are produced, and the und expert's weight-streaming matrix-vector product.

A separate pass that quantizes an activation costs about as much as FP8 GEMMs save
(docs/benchmarks.md, "Figures behind code defaults"), so each producer of a linear
layer's input writes e4m3 values and one fp32 scale per row itself: the RMSNorm before q/k/v and
before gate/up, the SwiGLU product before down. Only o_proj's input comes from an attention
kernel we do not own; `quantize_rows` reads it once.

Every kernel computes the bf16 value of its eager definition first (the same roundings as
`bagel.kernels.fused`), then quantizes it as `bagel.network.fp8.quantize_rows_reference` does: one
IEEE division per row for the factor, `x * (448 / amax)` rounded to nearest e4m3,
`scale = amax / 448`. Callers go through `bagel.network.fp8`, which falls back to plain PyTorch
where these do not apply.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: `bagel.network.fp8` uses its PyTorch reference
    triton = None

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3 value
AMAX_FLOOR = 1e-12  # an all-zero row gets this amax (scale ~2e-15), not a division by zero

# Rows of at most this many tokens take the weight-streaming kernel; a tile of 16 rows is the
# smallest a tensor-core dot takes, and more rows would read the weights again per tile.
MATVEC_MAX_ROWS = 16


if triton is not None:

    @triton.jit
    def _rms_norm_fp8_kernel(
        x_ptr, w_ptr, q_ptr, s_ptr, width, x_row_stride, eps,
        FP8_MAX: tl.constexpr, AMAX_FLOOR: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        live = cols < width
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=live, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / width + eps)
        in_ty = x_ptr.dtype.element_ty
        # Qwen2 order as in `bagel.kernels.fused`: normalise, round, scale by the weight, round.
        normed = (x * rstd).to(in_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=live, other=0.0).to(tl.float32)
        y = (normed * w).to(in_ty).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(y), axis=0), AMAX_FLOOR)
        factor = tl.div_rn(FP8_MAX, amax)
        q = tl.clamp(y * factor, -FP8_MAX, FP8_MAX).to(q_ptr.dtype.element_ty)
        tl.store(q_ptr + row * width + cols, q, mask=live)
        tl.store(s_ptr + row, tl.div_rn(amax, FP8_MAX))

    @triton.jit
    def _silu_mul_fp8_kernel(
        gate_ptr, up_ptr, q_ptr, s_ptr, width,
        FP8_MAX: tl.constexpr, AMAX_FLOOR: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # One program per row (18944 values at BAGEL-7B): a first sweep finds the row's amax, a
        # second recomputes the product and writes it quantized. The second sweep's reads of the
        # row it just read (76 KB of gate and up) come from L2, not from memory.
        row = tl.program_id(0).to(tl.int64)
        base = row * width
        in_ty = gate_ptr.dtype.element_ty
        running = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, width, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            live = cols < width
            g = tl.load(gate_ptr + base + cols, mask=live, other=0.0).to(tl.float32)
            u = tl.load(up_ptr + base + cols, mask=live, other=0.0).to(tl.float32)
            act = (g / (1.0 + tl.exp(-g))).to(in_ty).to(tl.float32)
            running = tl.maximum(running, tl.abs((act * u).to(in_ty).to(tl.float32)))
        amax = tl.maximum(tl.max(running, axis=0), AMAX_FLOOR)
        factor = tl.div_rn(FP8_MAX, amax)
        for start in range(0, width, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            live = cols < width
            g = tl.load(gate_ptr + base + cols, mask=live, other=0.0).to(tl.float32)
            u = tl.load(up_ptr + base + cols, mask=live, other=0.0).to(tl.float32)
            act = (g / (1.0 + tl.exp(-g))).to(in_ty).to(tl.float32)
            y = (act * u).to(in_ty).to(tl.float32)
            q = tl.clamp(y * factor, -FP8_MAX, FP8_MAX).to(q_ptr.dtype.element_ty)
            tl.store(q_ptr + base + cols, q, mask=live)
        tl.store(s_ptr + row, tl.div_rn(amax, FP8_MAX))

    @triton.jit
    def _quantize_rows_kernel(
        x_ptr, q_ptr, s_ptr, width, x_row_stride,
        FP8_MAX: tl.constexpr, AMAX_FLOOR: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        running = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, width, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + row * x_row_stride + cols, mask=cols < width, other=0.0)
            running = tl.maximum(running, tl.abs(x.to(tl.float32)))
        amax = tl.maximum(tl.max(running, axis=0), AMAX_FLOOR)
        factor = tl.div_rn(FP8_MAX, amax)
        for start in range(0, width, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            live = cols < width
            x = tl.load(x_ptr + row * x_row_stride + cols, mask=live, other=0.0).to(tl.float32)
            q = tl.clamp(x * factor, -FP8_MAX, FP8_MAX).to(q_ptr.dtype.element_ty)
            tl.store(q_ptr + row * width + cols, q, mask=live)
        tl.store(s_ptr + row, tl.div_rn(amax, FP8_MAX))

    @triton.jit
    def _fp8_weight_matmul_kernel(
        x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, rows, n, k, x_row_stride,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # out[m, n] = scale[n] * sum_k x[m, k] * w[n, k] (+ bias[n]): e4m3 -> half is exact, the
        # products are exact in fp32, the per-channel scale applies once at the end. Each program
        # streams BLOCK_N weight rows once, as stored (K contiguous); a few activation rows ride
        # along in a tensor-core tile padded to BLOCK_M.
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BLOCK_K)
        m_live = rm < rows
        n_live = rn < n
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * x_row_stride
        w_rows = w_ptr + rn.to(tl.int64)[:, None] * k
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, k, BLOCK_K):
            kk = start + rk
            k_live = kk < k
            x = tl.load(x_rows + kk[None, :], mask=m_live[:, None] & k_live[None, :], other=0.0)
            w = tl.load(w_rows + kk[None, :], mask=n_live[:, None] & k_live[None, :], other=0.0)
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        acc = acc * tl.load(scale_ptr + rn, mask=n_live, other=0.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_live, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + rm.to(tl.int64)[:, None] * n + rn[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_live[:, None] & n_live[None, :])


def _rows_of(x: Tensor) -> Tensor:
    """`x` as a 2-D `[rows, width]` view with unit column stride (a copy only if it has none)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _outputs(x: Tensor) -> tuple[Tensor, Tensor]:
    data = torch.empty(x.shape, dtype=FP8, device=x.device)
    scale = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    return data, scale


def rms_norm_fp8(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Qwen2 RMSNorm of `x` `[..., width]` (as `bagel.kernels.fused.rms_norm`), quantized per row:
    (e4m3 values `[..., width]`, fp32 scales `[..., 1]`)."""
    x2 = _rows_of(x)
    data, scale = _outputs(x)
    rows, width = x2.shape
    if rows:
        block = triton.next_power_of_2(width)
        _rms_norm_fp8_kernel[(rows,)](
            x2, weight, data, scale, width, x2.stride(0), eps,
            FP8_MAX=FP8_MAX, AMAX_FLOOR=AMAX_FLOOR, BLOCK=block,
            num_warps=8 if block >= 2048 else 4,
        )  # fmt: skip
    return data, scale


def silu_mul_fp8(gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """`silu(gate) * up` (as `bagel.kernels.fused.silu_mul`), quantized per row."""
    gate, up = gate.contiguous(), up.contiguous()
    data, scale = _outputs(gate)
    width = gate.shape[-1]
    rows = gate.numel() // width if width else 0
    if rows:
        block = min(2048, triton.next_power_of_2(width))
        _silu_mul_fp8_kernel[(rows,)](
            gate, up, data, scale, width,
            FP8_MAX=FP8_MAX, AMAX_FLOOR=AMAX_FLOOR, BLOCK=block, num_warps=8,
        )  # fmt: skip
    return data, scale


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """`x` `[..., width]` quantized per row: (e4m3 values, fp32 scales `[..., 1]`)."""
    x2 = _rows_of(x)
    data, scale = _outputs(x)
    rows, width = x2.shape
    if rows:
        block = min(4096, triton.next_power_of_2(width))
        _quantize_rows_kernel[(rows,)](
            x2, data, scale, width, x2.stride(0),
            FP8_MAX=FP8_MAX, AMAX_FLOOR=AMAX_FLOOR, BLOCK=block,
            num_warps=8 if block >= 2048 else 4,
        )  # fmt: skip
    return data, scale


def fp8_weight_matmul(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """`x @ (weight * scale[:, None]).T + bias` for a few rows of half-precision `x` `[..., K]`,
    e4m3 `weight` `[N, K]` and fp32 per-channel `scale` `[N]`, in one read of the weights."""
    x2 = _rows_of(x)
    rows, k = x2.shape
    n = weight.shape[0]
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows and n:
        # The fastest of the tiles tried (docs/benchmarks.md, FP8 section).
        block_m, block_n, block_k = 16, 32, 256
        grid = (triton.cdiv(n, block_n), triton.cdiv(rows, block_m))
        _fp8_weight_matmul_kernel[grid](
            x2, weight, scale, bias if bias is not None else scale, out, rows, n, k,
            x2.stride(0), HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_K=block_k, num_warps=4, num_stages=4,
        )  # fmt: skip
    return out.view(*x.shape[:-1], n)
