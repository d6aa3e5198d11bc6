"""The plain-PyTorch reference of the FP8 attention (`bagel.kernels.fp8_attention`) on CPU: its
quantizers' scales and rounding, its LSE, and its distance from fp32 attention within the e4m3
error bounds derived here.

e4m3 keeps 3 mantissa bits: rounding to nearest moves a normal value (magnitude >= 2^-6 in the
scaled domain) by at most 2^-4 of itself, and a subnormal one by at most 2^-10 (half the spacing
2^-9). With a block scale `s`, an element `x` thus comes back within `2^-4 |x| + 2^-10 s`."""

from __future__ import annotations

import math

import pytest
import torch

from bagel.kernels.fp8_attention import (
    K_BLOCK,
    P_SCALE,
    fp8_attention,
    fp8_attention_reference,
    quantize_blocks,
    quantize_channels,
)
from bagel.network.attention import expand_kv_heads
from diffusion_service.parallel.lse import attention_with_lse

UNIT = 2.0**-4  # e4m3's largest relative rounding error of a normal value
SUBNORMAL = 2.0**-10  # e4m3's largest absolute rounding error of a subnormal value, per unit scale


def randn(*shape, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=gen)).bfloat16()


def qkv(batch=2, q_len=130, heads=8, kv_heads=2, k_len=150, dim=64, seed=0):
    return (
        randn(batch, q_len, heads, dim, seed=seed),
        randn(batch, k_len, kv_heads, dim, seed=seed + 1),
        randn(batch, k_len, kv_heads, dim, seed=seed + 2),
    )


def per_row(scale, block, length):
    """`[B, H, blocks]` scales -> `[B, L, H, 1]`, each row's scale."""
    return scale.transpose(1, 2).repeat_interleave(block, dim=1)[:, :length, :, None]


def rounding_bound(x, scale):
    return UNIT * x.float().abs() + SUBNORMAL * scale


def dequantized(q, k, v, block_m=128):
    q8, qs = quantize_blocks(q, block_m)
    k8, ks = quantize_blocks(k, K_BLOCK)
    v8, vs = quantize_channels(v)
    return (
        q8.float() * per_row(qs, block_m, q.shape[1]),
        k8.float() * per_row(ks, K_BLOCK, k.shape[1]),
        v8.float() * vs[:, None],
    )


@pytest.mark.parametrize("block", [128, 64])
def test_quantize_blocks_gives_each_block_of_rows_and_head_its_own_scale(block):
    x = randn(2, 300, 3, 64, scale=2.0)
    x[0, 5, 1, 7] = 1000.0  # an outlier moves its own block's scale only
    data, scale = quantize_blocks(x, block)
    assert data.dtype == torch.float8_e4m3fn and data.shape == x.shape
    assert scale.shape == (2, 3, math.ceil(300 / block)) and scale.dtype == torch.float32
    rows = per_row(scale, block, 300)
    # Every block's largest magnitude lands on 448 exactly.
    padded = torch.nn.functional.pad(data.float().abs(), (0, 0, 0, 0, 0, -300 % block))
    peaks = padded.unflatten(1, (-1, block)).amax(dim=(2, 4))
    assert (peaks == 448.0).all()
    assert scale[0, 1, 0] == pytest.approx(1000.0 / 448.0)
    assert (scale[0, 1, 1:] < 0.1).all() and (scale[0, 0] < 0.1).all()
    err = (data.float() * rows - x.float()).abs()
    assert (err <= rounding_bound(x, rows)).all()
    assert err.max() > 0  # it rounds


def test_quantize_channels_gives_each_head_and_channel_one_scale_over_all_rows():
    x = randn(2, 300, 3, 64)
    x[1, 250, 2, 9] = -50.0
    data, scale = quantize_channels(x)
    assert scale.shape == (2, 3, 64)
    assert (data.float().abs().amax(dim=1) == 448.0).all()
    assert scale[1, 2, 9] == pytest.approx(50.0 / 448.0) and scale[1, 2, 8] < 0.1
    err = (data.float() * scale[:, None] - x.float()).abs()
    assert (err <= rounding_bound(x, scale[:, None])).all()


def test_all_zero_blocks_quantize_to_zero_without_nans():
    data, scale = quantize_blocks(torch.zeros(1, 10, 2, 64, dtype=torch.bfloat16), 128)
    assert (data.float() == 0).all() and (scale > 0).all()


@pytest.mark.parametrize("masked", [False, True])
def test_reference_lse_is_the_logsumexp_of_the_dequantized_scores(masked):
    q, k, v = qkv()
    mask = torch.ones(2, 150, dtype=torch.bool)
    if masked:
        mask[0, :7] = False
        mask[1, 140:] = False
    qd, kd, _ = dequantized(q, k, v)
    scores = torch.einsum("bqhd,bshd->bhqs", qd, expand_kv_heads(kd, 8)) / 8.0
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    _, lse = fp8_attention_reference(q, k, v, mask if masked else None)
    assert lse.shape == (2, 130, 8) and lse.dtype == torch.float32
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1).transpose(1, 2))


def test_reference_lse_is_within_the_score_rounding_of_the_fp32_lse():
    """Moving every score by at most d moves the LSE by at most d; d per (query, key) follows
    from the per-element bounds of q and k."""
    q, k, v = qkv(dim=128)
    q8, qs = quantize_blocks(q, 128)
    k8, ks = quantize_blocks(k, K_BLOCK)
    eq = rounding_bound(q, per_row(qs, 128, 130))
    ek = expand_kv_heads(rounding_bound(k, per_row(ks, K_BLOCK, 150)), 8)
    qa, ka = q.float().abs(), expand_kv_heads(k.float().abs(), 8)
    bound = (
        torch.einsum("bqhd,bshd->bqhs", eq, ka)
        + torch.einsum("bqhd,bshd->bqhs", qa, ek)
        + torch.einsum("bqhd,bshd->bqhs", eq, ek)
    ) / math.sqrt(128)
    _, lse = fp8_attention_reference(q, k, v)
    _, want = attention_with_lse(q.float(), k.float(), v.float())
    assert ((lse - want).abs() <= bound.amax(dim=-1) + 1e-5).all()


@pytest.mark.parametrize("pv_fp8", [True, False])
def test_reference_is_attention_over_the_dequantized_inputs_up_to_rounding_p(pv_fp8):
    """With q, k (and v) dequantized, what is left is P's rounding: e4m3 moves each weight by at
    most 2^-4 of itself plus 2^-18 (half e4m3's subnormal spacing, P being stored times 256),
    bf16 by at most 2^-8 of itself; the row's weights sum to at least 1 before normalising."""
    q, k, v = qkv()
    qd, kd, vd = dequantized(q, k, v)
    want, _ = attention_with_lse(qd, kd, vd if pv_fp8 else v.float())
    got, _ = fp8_attention_reference(q, k, v, pv_fp8=pv_fp8, block_n=64)
    values = (vd if pv_fp8 else v.float()).abs()
    peak = expand_kv_heads(values.amax(dim=1, keepdim=True), 8)  # [B, 1, H, D]
    bound = (UNIT + SUBNORMAL / P_SCALE * k.shape[1] if pv_fp8 else 2.0**-8) * peak
    err = (got - want).abs()
    assert (err <= bound + 1e-6).all()
    assert err.max() > 0


def test_reference_agrees_with_fp32_attention_within_the_fp8_error():
    """Scores of unit q, k move by about 2^-4/sqrt(3) * sqrt(2) (two roundings of relative RMS
    at most 2^-4/sqrt(3)), the values by 2^-4/sqrt(3) of the channel's peak at most; averaged
    over many keys the output's RMS error stays below that, 2^-4/sqrt(3) ~ -29 dB of the
    output's peak; bf16 P·V on the same scores is no worse."""
    q, k, v = qkv(batch=1, q_len=256, heads=14, kv_heads=2, k_len=700, dim=128)
    want, _ = attention_with_lse(q.float(), k.float(), v.float())
    for pv_fp8 in (True, False):
        got, _ = fp8_attention_reference(q, k, v, pv_fp8=pv_fp8)
        rms = (got - want).pow(2).mean().sqrt()
        assert 20 * math.log10(want.abs().max() / rms) > 29.0
        assert rms > 0


def test_reference_with_gqa_equals_the_reference_with_the_kv_heads_copied():
    q, k, v = qkv(heads=14, kv_heads=2)
    got = fp8_attention_reference(q, k, v, block_n=64)
    want = fp8_attention_reference(q, expand_kv_heads(k, 14), expand_kv_heads(v, 14), block_n=64)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_reference_gives_a_query_with_no_real_key_zero_output_and_minus_inf_lse():
    q, k, v = qkv()
    mask = torch.ones(2, 150, dtype=torch.bool)
    mask[1] = False
    out, lse = fp8_attention_reference(q, k, v, mask)
    assert (out[1] == 0).all() and (lse[1] == float("-inf")).all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(lse[0]).all()


def test_reference_rounds_p_against_the_running_maximum_of_its_key_tiles():
    """A tile whose keys all score below a later tile's maximum has its P rounded before the
    rescale: with one tile (the final maximum) and with tiles of 32 the outputs differ, by no more
    than two roundings of P."""
    q, k, v = qkv()
    one, lse = fp8_attention_reference(q, k, v)
    tiled, lse_tiled = fp8_attention_reference(q, k, v, block_n=32)
    torch.testing.assert_close(lse, lse_tiled, rtol=0, atol=0)
    peak = expand_kv_heads(v.float().abs().amax(dim=1, keepdim=True), 8)
    assert ((one - tiled).abs() <= 2.2 * UNIT * peak).all()
    assert (one != tiled).any()


def test_the_kernel_refuses_what_it_does_not_take():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="CUDA"):
        fp8_attention(q, k, v)
