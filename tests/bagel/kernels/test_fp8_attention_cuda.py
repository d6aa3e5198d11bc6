"""The Triton FP8 attention (`bagel.kernels.fp8_attention`) on a GPU: tightly against its
plain-PyTorch reference run with the kernel's own tiles, loosely (in dB) against cuDNN's bf16
attention, with GQA, a key mask, lengths that are no multiple of any tile, and the LSE that
sequence-parallel merges read. Skipped without a GPU that has FP8 tensor cores."""

from __future__ import annotations

import math

import pytest
import torch

from bagel.kernels import fp8_attention as fa
from bagel.network.attention import expand_kv_heads
from diffusion_service.parallel.lse import attention_with_lse

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not fa.available(), reason="needs Triton and a CUDA GPU with FP8 (sm_89+)"),
]

# BAGEL-7B at 1024x1024: 28 query heads over 4 KV heads of 128, 2 markers + 4096 latents against
# a short text prefix and the latents; and a small odd case.
FULL = dict(batch=1, q_len=4098, heads=28, kv_heads=4, k_len=4133, dim=128)
SMALL = dict(batch=2, q_len=130, heads=8, kv_heads=2, k_len=150, dim=64)


def qkv(batch, q_len, heads, kv_heads, k_len, dim, seed=0, dtype=torch.bfloat16):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda").to(dtype)

    return (
        randn(batch, q_len, heads, dim),
        randn(batch, k_len, kv_heads, dim),
        randn(batch, k_len, kv_heads, dim),
    )


def prefix_mask(batch, k_len, pad=7):
    """Branch 0's text prefix is `pad` keys shorter than branch 1's: its first keys are pad."""
    mask = torch.ones(batch, k_len, dtype=torch.bool, device="cuda")
    mask[0, :pad] = False
    return mask


def psnr_db(got, want):
    rms = (got.float() - want.float()).pow(2).mean().sqrt().item()
    return 20 * math.log10(want.abs().max().item() / max(rms, 1e-30))


def assert_matches_reference(out, lse, q, k, v, mask, pv_fp8, config):
    """Within a bf16 rounding of the output plus a few e4m3 roundings of P decided the other
    way (the kernel's fp32 scores come from Hopper's FP8 accumulation and exp2, the reference's
    from fp32 products and exp), and in RMS far below the quantization's own error against fp32
    attention."""
    want, want_lse = fa.fp8_attention_reference(
        q, k, v, mask, pv_fp8=pv_fp8, block_m=config.block_m, block_n=config.block_n
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    err = (out.float() - want).abs()
    assert (err <= 2.0**-7 * want.abs() + 0.05 * want.abs().max()).all(), f"max {err.max()}"
    plain, _ = attention_with_lse(q.float(), k.float(), v.float(), mask)
    own = (want - plain).pow(2).mean().sqrt()
    assert err.pow(2).mean().sqrt() <= 0.25 * own
    live = torch.isfinite(want_lse)
    assert (torch.isfinite(lse) == live).all()
    torch.testing.assert_close(lse[live], want_lse[live], rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize("pv_fp8", [True, False], ids=["pv-fp8", "pv-bf16"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "key-mask"])
@pytest.mark.parametrize("shape", [FULL, SMALL], ids=["1024px", "small"])
def test_kernel_matches_its_reference(shape, masked, pv_fp8):
    q, k, v = qkv(**shape)
    mask = prefix_mask(shape["batch"], shape["k_len"]) if masked else None
    out, lse = fa.fp8_attention(q, k, v, mask, pv_fp8=pv_fp8)
    assert_matches_reference(out, lse, q, k, v, mask, pv_fp8, fa.DEFAULT_CONFIG)


@pytest.mark.parametrize("shape", [FULL, SMALL], ids=["1024px", "small"])
def test_quantize_kv_equals_the_reference_quantizers_to_the_bit(shape):
    _, k, v = qkv(**shape)
    kv = fa.quantize_kv(k, v)
    k8, k_scale = fa.quantize_blocks(k, fa.K_BLOCK)
    v8, v_scale = fa.quantize_channels(v)
    bits = torch.uint8
    assert torch.equal(kv.k.view(bits), k8.transpose(1, 2).contiguous().view(bits))
    assert torch.equal(kv.k_scale, k_scale)
    v_keys_last = v8.permute(0, 2, 3, 1).contiguous().view(bits)
    assert torch.equal(kv.v[..., : shape["k_len"]].view(bits), v_keys_last)
    assert torch.equal(kv.v_scale, v_scale)
    plain = fa.quantize_kv(k, v, pv_fp8=False)
    assert plain.v is v and plain.v_scale is None
    assert torch.equal(plain.k.view(bits), kv.k.view(bits))


@pytest.mark.parametrize("name", list(fa.CONFIGS))
def test_every_benchmarked_config_matches_the_reference(name):
    """At head dim 128, as the benchmark runs them (shared memory grows with it)."""
    config = fa.CONFIGS[name]
    q, k, v = qkv(**{**SMALL, "dim": 128})
    mask = prefix_mask(2, SMALL["k_len"])
    for pv_fp8 in (True, False):
        out, lse = fa.fp8_attention(q, k, v, mask, pv_fp8=pv_fp8, config=config)
        assert_matches_reference(out, lse, q, k, v, mask, pv_fp8, config)


@pytest.mark.parametrize("pv_fp8", [True, False], ids=["pv-fp8", "pv-bf16"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "key-mask"])
def test_kernel_is_close_to_cudnn_bf16_attention(masked, pv_fp8):
    """Unit q, k, v at the 1024x1024 shape: the reference's e4m3 roundings cost 42 dB (P·V in
    FP8) and 44 dB (in bf16) against fp32 on CPU, bf16's own output rounding ~75 dB."""
    q, k, v = qkv(**FULL)
    mask = prefix_mask(1, FULL["k_len"]) if masked else None
    out, lse = fa.fp8_attention(q, k, v, mask, pv_fp8=pv_fp8)
    want, want_lse = attention_with_lse(q, k, v, mask)  # cuDNN, bf16 in, fp32 out and LSE
    assert psnr_db(out, want) > 38.0
    assert (lse - want_lse).abs().max() < 0.1


def test_gqa_reads_the_kv_heads_as_copying_them_would():
    q, k, v = qkv(**SMALL)
    got = fa.fp8_attention(q, k, v)
    want = fa.fp8_attention(q, expand_kv_heads(k, 8), expand_kv_heads(v, 8))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_query_with_no_real_key_gets_zero_output_and_minus_inf_lse():
    q, k, v = qkv(**SMALL)
    mask = torch.ones(2, SMALL["k_len"], dtype=torch.bool, device="cuda")
    mask[1] = False
    for pv_fp8 in (True, False):
        out, lse = fa.fp8_attention(q, k, v, mask, pv_fp8=pv_fp8)
        assert (out[1] == 0).all() and (lse[1] == float("-inf")).all()
        assert torch.isfinite(out[0]).all() and torch.isfinite(lse[0]).all()


def test_fp16_inputs_and_strided_queries():
    """fp16 as well as bf16; q as a slice of a wider tensor (the fused q/k/v projection's
    layout), read through its strides."""
    q, k, v = qkv(**SMALL, dtype=torch.float16)
    wide = torch.cat([q, q], dim=2)[:, :, :8]
    assert not wide.is_contiguous()
    out, lse = fa.fp8_attention(wide, k, v)
    assert_matches_reference(out, lse, q, k, v, None, True, fa.DEFAULT_CONFIG)


def test_lse_merges_two_key_halves_into_the_whole():
    """What Ring attention does with it: attention over two key blocks, merged by LSE, equals
    attention over all keys, within the quantization's error (the blocks' K and V scales
    differ from the whole's)."""
    from diffusion_service.parallel.lse import merge_attention

    q, k, v = qkv(**SMALL)
    whole, whole_lse = fa.fp8_attention(q, k, v)
    a = fa.fp8_attention(q, k[:, :70], v[:, :70])
    b = fa.fp8_attention(q, k[:, 70:], v[:, 70:])
    merged, merged_lse = merge_attention(*a, *b)
    assert psnr_db(merged, whole.float()) > 38.0
    assert (merged_lse - whole_lse).abs().max() < 0.08
