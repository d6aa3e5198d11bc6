"""The FP8 kernels of `bagel.kernels.fused_fp8` and `torch._scaled_mm` against the plain-PyTorch
reference of `bagel.network.fp8`, and the whole generation forward in FP8 against bf16, on a GPU
with FP8 tensor cores (skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bagel.kernels import fused, fused_fp8
from bagel.network import fp8

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (
            torch.cuda.is_available()
            and fused.enabled()
            and torch.cuda.get_device_capability() >= (8, 9)
        ),
        reason="needs a CUDA GPU with FP8 tensor cores and Triton",
    ),
]


def randn(*shape, seed=0, scale=1.0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return (scale * torch.randn(*shape, generator=gen, device="cuda")).bfloat16()


def rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def assert_same_quantization(got: tuple, want: tuple, exact_share: float) -> None:
    """Kernel and reference quantize the same bf16 values up to one bf16 rounding of an input
    (a fp32 sum in another order, an approximate exp or division), which can move a row's
    amax: scales agree to 2^-7, every value to one e4m3 step (2^-3 relative, or the subnormal
    step), and in rows of equal scale most codes are equal."""
    (data, scale), (ref_data, ref_scale) = got, want
    assert data.dtype == torch.float8_e4m3fn and data.shape == ref_data.shape
    assert scale.shape == ref_scale.shape == (*data.shape[:-1], 1)
    assert ((scale - ref_scale).abs() <= 2.0**-7 * ref_scale).all()
    value, ref_value = data.float(), ref_data.float()
    step = torch.maximum(ref_value.abs() * 2.0**-3, torch.full_like(ref_value, 2.0**-9))
    assert ((value - ref_value).abs() <= step + 2.0**-9).all()
    same_scale = (scale == ref_scale).squeeze(-1)
    if same_scale.numel() >= 100:  # a few rows may all have moved; thousands may not
        assert same_scale.float().mean().item() > 0.5
    if same_scale.any():
        equal = (value[same_scale] == ref_value[same_scale]).float().mean().item()
        assert equal >= exact_share, f"only {equal:.5f} of the codes are equal"


@pytest.mark.parametrize("shape", [(2, 4098, 3584), (1, 2, 3584), (5, 100)])
def test_rms_norm_fp8_quantizes_the_fused_rms_norm(shape):
    x, weight = randn(*shape, scale=4.0), randn(shape[-1], seed=1, scale=0.2) + 1
    want = fp8.quantize_rows_reference(weight * F.rms_norm(x, (shape[-1],), eps=1e-6))
    assert_same_quantization(fused_fp8.rms_norm_fp8(x, weight, 1e-6), want, 0.98)


@pytest.mark.parametrize("shape", [(2, 4098, 18944), (1, 2, 18944), (3, 1001)])
def test_silu_mul_fp8_quantizes_the_swiglu_product(shape):
    gate, up = randn(*shape, scale=3.0), randn(*shape, seed=1)
    want = fp8.quantize_rows_reference(F.silu(gate) * up)
    assert_same_quantization(fused_fp8.silu_mul_fp8(gate, up), want, 0.98)


@pytest.mark.parametrize("shape", [(2, 4098, 3584), (3, 7, 100)])
def test_quantize_rows_kernel_equals_the_reference(shape):
    x = randn(*shape, scale=2.0)
    x[..., 0, 3] = 0  # the zero row case is covered on CPU; here one exact zero in a row
    strided = randn(64, 2 * 3584)[:, 5 : 5 + 3584]  # a view with a row stride of its own
    for rows in (x, strided):
        # The same values and the same arithmetic (IEEE divisions, round to nearest even).
        data, scale = fused_fp8.quantize_rows(rows)
        want_data, want_scale = fp8.quantize_rows_reference(rows)
        assert torch.equal(scale, want_scale)
        assert torch.equal(data.view(torch.uint8), want_data.view(torch.uint8))


@pytest.mark.parametrize("rows", [8196, 37, 1])
@pytest.mark.parametrize("bias", [True, False])
def test_scaled_mm_path_equals_the_reference_product(rows, bias):
    a = fp8.quantize_rows(randn(rows, 3584, scale=2.0))
    weight, scale = fp8.quantize_weight(randn(4608, 3584, seed=1) / 60)
    b = randn(4608, seed=2, scale=0.1) if bias else None
    got = fp8.fp8_linear(a, weight, scale, b)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 4608)
    want = fp8.scaled_matmul_reference(a.data, a.scale, weight, scale, b)
    # The bf16 rounding of the output (2^-9) and the tensor cores' fast accumulation
    # (`fp8.FAST_ACCUM`; 4.2e-3 in all at K = 18944 on an H200).
    assert rel_l2(got, want) < 6e-3


@pytest.mark.parametrize("rows", [1, 4, 16, 17])
@pytest.mark.parametrize("n, k", [(3584, 3584), (512, 3584), (3584, 18944)])
def test_weight_streaming_kernel_equals_the_reference_product(rows, n, k):
    x = randn(rows, k)
    weight, scale = fp8.quantize_weight(randn(n, k, seed=1) / k**0.5)
    bias = randn(n, seed=2, scale=0.1)
    got = fp8.fp8_weight_linear(x, weight, scale, bias)  # 17 rows: the dequantizing fallback
    want = (x.float() @ weight.float().t()) * scale + bias.float()
    assert got.dtype == torch.bfloat16 and rel_l2(got, want) < 4e-3


def test_fp8_forward_on_the_gpu_agrees_with_bf16_and_with_the_cpu_reference(
    tiny_model_dir, monkeypatch
):
    """The tiny checkpoint, one generation forward of two branches: FP8 with the fused kernels,
    FP8 with the plain-PyTorch quantization (same GEMMs), and bf16; then FP8 replayed from a
    CUDA graph, which must equal eager FP8."""
    from bagel.checkpoints.checkpoint import load_bagel
    from bagel.diffusion.generation import BlockVelocity, ForwardGraphs
    from bagel.network.latents import latent_position_ids

    noise = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))

    def forward(model, graphs=None) -> torch.Tensor:
        cond, uncond = model.prefill([[5, 17, 29, 3], []])
        velocity = BlockVelocity(
            model, {"c": cond, "u": uncond}, latent_position_ids(8, 8, 64), (1, 2), graphs=graphs
        )
        out = velocity(noise.cuda(), torch.tensor(0.7), ("c", "u"))
        return torch.stack([out["c"], out["u"]]).float()

    bf16 = load_bagel(tiny_model_dir, "diffusion", dtype=torch.bfloat16, device="cuda")
    assert noise.shape[1] == bf16.config.patch_dim
    quantized = load_bagel(
        tiny_model_dir, "diffusion", dtype=torch.bfloat16, device="cuda", linear_precision="fp8"
    )
    with_kernels = forward(quantized)
    plain = forward(bf16)
    graphed = forward(quantized, ForwardGraphs())
    assert torch.equal(graphed, forward(quantized, ForwardGraphs()))
    assert rel_l2(graphed, with_kernels) < 1e-2
    monkeypatch.setenv("BAGEL_FUSED_KERNELS", "0")
    without_kernels = forward(quantized)
    assert rel_l2(with_kernels, without_kernels) < 2e-2
    # e4m3 against bf16: ~3% on CPU (fp32 against FP8 reference) for this checkpoint.
    assert 1e-3 < rel_l2(with_kernels, plain) < 0.08
