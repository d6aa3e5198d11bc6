"""FP8 linear layers (`bagel.network.fp8`) on a CPU: the reference quantization's error bounds, the
layers against fp32, quantize-at-load, and the pipeline end to end on the tiny checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bagel.checkpoints.checkpoint import load_bagel
from bagel.network import fp8
from bagel.network.layers import RMSNorm, SwiGLU
from bagel.pipeline import Pipeline
from serving.params import GenerationParams

# e4m3: 3 mantissa bits, so rounding to nearest is off by at most 2^-4 of the value for
# normal numbers (|v| >= 2^-6); below that the spacing is 2^-9, half a step 2^-10.
HALF_STEP = 2.0**-4
MIN_NORMAL = 2.0**-6
SUBNORMAL_HALF_STEP = 2.0**-10
# Relative L2 error of a product of two per-row e4m3 operands of Gaussian data (each rounded
# with an RMS relative error of ~2.5%): 3.6% measured here; one operand alone: 2.5%.
E4M3_PRODUCT_REL_L2 = 0.05


def rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def gaussian(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def assert_within_half_an_e4m3_step(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor):
    got = data.float() * scale
    scaled = x.abs() / scale
    bound = torch.where(scaled >= MIN_NORMAL, HALF_STEP * x.abs(), SUBNORMAL_HALF_STEP * scale)
    assert ((got - x).abs() <= bound * (1 + 1e-6)).all()


def test_quantize_rows_round_trip_is_within_half_an_e4m3_step_per_token():
    # Rows of very different magnitudes, one with an outlier: each gets its own scale.
    x = gaussian(6, 512) * torch.tensor([1e-3, 1.0, 30.0, 1.0, 1e4, 0.1])[:, None]
    x[3, 7] = 500.0
    data, scale = fp8.quantize_rows_reference(x)
    assert data.dtype == torch.float8_e4m3fn and scale.shape == (6, 1)
    assert_within_half_an_e4m3_step(x, data, scale)
    # Each row's largest magnitude lands on +-448, the largest finite e4m3 value, exactly.
    assert torch.equal(data.float().abs().amax(dim=1), torch.full((6,), 448.0))
    assert torch.allclose(scale.squeeze(1), x.abs().amax(dim=1) / 448.0, rtol=1e-7)


def test_an_all_zero_row_quantizes_to_zeros_without_nans():
    data, scale = fp8.quantize_rows_reference(torch.zeros(2, 64))
    assert torch.equal(data.float(), torch.zeros(2, 64))
    assert torch.isfinite(scale).all() and (scale > 0).all()


def test_quantize_weight_scales_each_output_channel():
    w = gaussian(48, 80, seed=1) * torch.linspace(0.01, 10, 48)[:, None]
    data, scale = fp8.quantize_weight(w)
    assert data.shape == w.shape and scale.shape == (48,) and scale.dtype == torch.float32
    assert_within_half_an_e4m3_step(w, data, scale[:, None])


def test_the_round_trip_check_can_fail():
    x = gaussian(4, 64)
    data, scale = fp8.quantize_rows_reference(x)
    with pytest.raises(AssertionError):
        assert_within_half_an_e4m3_step(x * 1.1, data, scale)


def test_fp8_linear_is_the_product_of_its_dequantized_operands():
    linear = nn.Linear(96, 64)
    x = gaussian(3, 5, 96, seed=2)
    layer = fp8.Fp8Linear(linear)
    rows = fp8.quantize_rows(x)
    want = (rows.data.float() * rows.scale) @ (
        layer.weight.float() * layer.weight_scale[:, None]
    ).t() + linear.bias
    got = layer(x)
    assert got.shape == (3, 5, 64) and got.dtype == x.dtype
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer(rows), got)  # pre-quantized input, same product


@pytest.mark.parametrize("bias", [True, False])
def test_fp8_linear_matches_fp32_within_the_e4m3_error(bias):
    linear = nn.Linear(512, 256, bias=bias)
    x = gaussian(64, 512, seed=3)
    want = linear(x)
    error = rel_l2(fp8.Fp8Linear(linear)(x), want)
    assert 0.005 < error < E4M3_PRODUCT_REL_L2, error  # quantized, and no worse than e4m3


def test_fp8_weight_linear_matches_fp32_within_the_weight_rounding():
    linear = nn.Linear(512, 256)
    x = gaussian(4, 512, seed=4)
    layer = fp8.Fp8WeightLinear(linear)
    got = layer(x)
    assert torch.allclose(
        got, x @ (layer.weight.float() * layer.weight_scale[:, None]).t() + linear.bias, atol=1e-5
    )
    assert 0.002 < rel_l2(got, linear(x)) < E4M3_PRODUCT_REL_L2


def test_fp8_norm_and_mlp_hand_their_outputs_over_quantized():
    torch.manual_seed(0)
    norm = RMSNorm(256)
    norm.weight.data = 1 + 0.1 * torch.randn(256)
    mlp = SwiGLU(256, 512)
    x = gaussian(2, 7, 256, seed=5)
    quantized = fp8.Fp8RMSNorm.of(norm)(x)
    assert isinstance(quantized, fp8.QuantizedRows)
    assert quantized.shape == (2, 7, 256) and quantized.scale.shape == (2, 7, 1)
    assert_within_half_an_e4m3_step(norm(x), quantized.data, quantized.scale)
    out = fp8.Fp8SwiGLU(mlp)(quantized)
    # Three FP8 products in a row, each adding an e4m3 rounding of both operands.
    assert 0.005 < rel_l2(out, mlp(norm(x))) < 2 * E4M3_PRODUCT_REL_L2


def test_fp8_mlp_adds_to_the_residual_and_refuses_the_packed_form():
    torch.manual_seed(0)
    mlp = SwiGLU(64, 128)
    quantized = fp8.Fp8SwiGLU(mlp)
    x, residual = gaussian(3, 64, seed=1), gaussian(3, 64, seed=2)
    assert torch.equal(quantized.add_to(residual, x), residual + quantized(x))
    with pytest.raises(ValueError, match="no packed"):
        quantized.add_to(residual, x, packed=True)


def test_load_quantizes_the_decoder_linears_and_keeps_everything_else(tiny_model_dir: Path):
    full = load_bagel(tiny_model_dir, "diffusion")
    quantized = load_bagel(tiny_model_dir, "diffusion", linear_precision="fp8")
    layer = quantized.layers[0]
    attn = layer.self_attn
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert isinstance(getattr(attn, f"{name}_moe_gen"), fp8.Fp8Linear)
        assert isinstance(getattr(attn, name), fp8.Fp8WeightLinear)
    assert isinstance(layer.mlp_moe_gen, fp8.Fp8SwiGLU)
    assert isinstance(layer.mlp.down_proj, fp8.Fp8WeightLinear)
    assert isinstance(layer.input_layernorm_moe_gen, fp8.Fp8RMSNorm)
    assert type(layer.input_layernorm) is RMSNorm  # the und norm feeds bf16 activations
    names = fp8.quantized_weight_names(full)
    assert len(names) == 14 * len(full.layers)
    state, reference = quantized.state_dict(), full.state_dict()
    for name, tensor in reference.items():
        if name in names:
            data, scale = fp8.quantize_weight(tensor)
            assert torch.equal(state[name].float(), data.float())
            assert torch.equal(state[f"{name}_scale"], scale)
        else:
            assert torch.equal(state[name], tensor), name
    assert set(state) == set(reference) | {f"{n}_scale" for n in names}
    # Quantizing at load and swapping a loaded model give the same modules.
    swapped = fp8.use_fp8_linears(full).state_dict()
    assert all(torch.equal(swapped[k].float(), v.float()) for k, v in state.items())


def test_load_rejects_fp8_for_prefill_and_unknown_precisions(tiny_model_dir: Path):
    with pytest.raises(ValueError, match="diffusion role"):
        load_bagel(tiny_model_dir, "prefill", linear_precision="fp8")
    with pytest.raises(ValueError, match="linear precision"):
        load_bagel(tiny_model_dir, "diffusion", linear_precision="int4")


def test_pipeline_in_fp8_generates_close_to_the_fp32_pipeline(tiny_model_dir: Path):
    params = GenerationParams(height=64, width=64, num_timesteps=6, seed=3)
    exact = Pipeline(tiny_model_dir, "cpu").generate("a red circle", params)
    pipeline = Pipeline(tiny_model_dir, "cpu", linear_precision="fp8")
    assert isinstance(pipeline.model.layers[0].mlp_moe_gen, fp8.Fp8SwiGLU)
    out = pipeline.generate("a red circle", params)
    assert out.image.size == (64, 64)
    # 4 layers of e4m3 products over 6 steps: 2.9% on the tiny checkpoint's random weights.
    assert 1e-3 < rel_l2(out.latents, exact.latents) < 0.08


def test_swapping_a_linear_for_fp8_keeps_its_bias_and_shape():
    linear = nn.Linear(32, 16)
    layer = fp8.Fp8Linear(linear)
    assert layer.bias is linear.bias
    assert (layer.in_features, layer.out_features) == (32, 16)
    assert layer(torch.zeros(3, 32)).shape == (3, 16)
