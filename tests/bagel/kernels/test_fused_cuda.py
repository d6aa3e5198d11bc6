"""The Triton kernels of `bagel.kernels.fused` against the eager definitions they replace, in bf16
on a GPU (skipped on CPU, where the model never calls them)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bagel.kernels import fused
from bagel.network.layers import apply_rope, rope_cos_sin

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and fused.enabled()), reason="needs CUDA and Triton"
    ),
]


def assert_within_one_rounding(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal to the last bit almost everywhere; elsewhere within two bf16 units in the last
    place (2^-6 relative): a fp32 sum taken in another order can flip a rounding, and RMSNorm
    rounds twice (the normalised value, then its product with the weight)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    g, w = got.float(), want.float()
    diff = (g - w).abs()
    assert (diff <= 2.0**-6 * w.abs() + 1e-6).all(), f"max diff {diff.max().item()}"
    equal = (diff == 0).float().mean().item()
    assert equal > 0.98, f"only {equal:.4f} of the elements are equal"


def randn(*shape, seed=0, scale=1.0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return (scale * torch.randn(*shape, generator=gen, device="cuda")).bfloat16()


@pytest.mark.parametrize("shape", [(2, 4098, 28, 128), (1, 33, 4, 128), (3, 7, 2, 64)])
def test_qk_norm_rope_matches_eager_for_one_position_per_branch(shape):
    batch, seq, heads, dim = shape
    x, weight = randn(*shape, scale=3.0), randn(dim, seed=1, scale=0.1) + 1
    cos, sin = rope_cos_sin(torch.tensor([40, 7, 123][:batch], device="cuda"), dim, 1e6)
    cos, sin = cos[:, None, None, :], sin[:, None, None, :]  # as the generation block has them
    want = apply_rope(weight * F.rms_norm(x.float(), (dim,), eps=1e-6), cos, sin).bfloat16()
    assert_within_one_rounding(fused.qk_norm_rope(x, weight, cos, sin, 1e-6), want)


def test_qk_norm_rope_matches_eager_for_positions_along_the_sequence():
    x, weight = randn(3, 50, 4, 128), randn(128, seed=1, scale=0.1) + 1
    cos, sin = rope_cos_sin(torch.arange(50, device="cuda"), 128, 1e6)
    cos, sin = cos[:, None, :], sin[:, None, :]  # as prefill has them: [L, 1, D]
    want = apply_rope(weight * F.rms_norm(x.float(), (128,), eps=1e-6), cos, sin).bfloat16()
    assert_within_one_rounding(fused.qk_norm_rope(x, weight, cos, sin, 1e-6), want)


@pytest.mark.parametrize("shape", [(2, 4096, 3584), (1, 2, 3584), (5, 100)])
def test_rms_norm_matches_eager(shape):
    x, weight = randn(*shape, scale=4.0), randn(shape[-1], seed=1, scale=0.2) + 1
    want = weight * F.rms_norm(x, (shape[-1],), eps=1e-6)
    assert_within_one_rounding(fused.rms_norm(x, weight, 1e-6), want)


@pytest.mark.parametrize("shape", [(2, 4096, 18944), (1, 2, 18944), (3, 1001)])
def test_silu_mul_matches_eager(shape):
    gate, up = randn(*shape, scale=3.0), randn(*shape, seed=1)
    assert_within_one_rounding(fused.silu_mul(gate, up), F.silu(gate) * up)


def test_kernels_change_the_output():
    """The comparison above can fail: a wrong weight or position is caught."""
    x, weight = randn(1, 9, 4, 128), randn(128, seed=1, scale=0.1) + 1
    cos, sin = rope_cos_sin(torch.tensor([5], device="cuda"), 128, 1e6)
    cos, sin = cos[:, None, None, :], sin[:, None, None, :]
    want = apply_rope(weight * F.rms_norm(x.float(), (128,), eps=1e-6), cos, sin).bfloat16()
    with pytest.raises(AssertionError):
        assert_within_one_rounding(fused.qk_norm_rope(x, weight + 0.05, cos, sin, 1e-6), want)
    other_cos, other_sin = rope_cos_sin(torch.tensor([6], device="cuda"), 128, 1e6)
    with pytest.raises(AssertionError):
        assert_within_one_rounding(
            fused.qk_norm_rope(
                x, weight, other_cos[:, None, None, :], other_sin[:, None, None, :], 1e-6
            ),
            want,
        )


def test_generation_forward_agrees_with_eager(tiny_model_dir, monkeypatch):
    """The tiny checkpoint in bf16: prefill plus one generation forward, kernels on and off."""
    from bagel.checkpoints.checkpoint import load_bagel
    from bagel.diffusion.generation import BlockVelocity
    from bagel.network.latents import latent_position_ids

    model = load_bagel(tiny_model_dir, "diffusion", dtype=torch.bfloat16, device="cuda")
    noise = torch.randn(64, model.config.patch_dim, generator=torch.Generator().manual_seed(0))

    def forward() -> torch.Tensor:
        cond, uncond = model.prefill([[5, 17, 29, 3], []])
        velocity = BlockVelocity(
            model, {"c": cond, "u": uncond}, latent_position_ids(8, 8, 64), (1, 2)
        )
        out = velocity(noise.cuda(), torch.tensor(0.7), ("c", "u"))
        return torch.stack([out["c"], out["u"]]).float()

    with_kernels = forward()
    monkeypatch.setenv("BAGEL_FUSED_KERNELS", "0")
    eager = forward()
    assert ((with_kernels - eager).norm() / eager.norm()).item() < 1e-2


def test_silu_mul_written_over_its_gate_equals_the_out_of_place_product():
    gate = torch.randn(4098, 18944 // 8, device="cuda", dtype=torch.bfloat16)
    up = torch.randn_like(gate)
    want = fused.silu_mul(gate, up)
    got = fused.silu_mul(gate, up, out=gate)
    assert got.data_ptr() == gate.data_ptr()
    assert torch.equal(got, want)


@pytest.mark.parametrize("rows", [1, 3])
def test_silu_mul_reads_a_packed_projections_halves_in_place(rows):
    packed = randn(rows, 1, 2 * 1001, scale=3.0)
    gate, up = packed.chunk(2, dim=-1)
    assert not gate.is_contiguous() or rows == 1
    want = fused.silu_mul(gate.contiguous(), up.contiguous())
    assert torch.equal(fused.silu_mul(gate, up), want)
    assert_within_one_rounding(want, F.silu(gate) * up)


@pytest.mark.parametrize("rows", [1, 5])
def test_qkv_into_cache_writes_the_cache_and_returns_q_as_the_separate_kernels_do(rows):
    from bagel.kernels import fused_decode

    heads, kv_heads, dim, capacity = 28, 4, 128, 64
    qkv = randn(rows, (heads + 2 * kv_heads) * dim, scale=3.0)
    q_weight, k_weight = randn(dim, seed=1, scale=0.1) + 1, randn(dim, seed=2, scale=0.1) + 1
    positions = torch.tensor([40, 7, 123, 0, 9][:rows], device="cuda")
    lengths = torch.tensor([3, 0, 63, 17, 5][:rows], device="cuda")
    cos, sin = rope_cos_sin(positions, dim, 1e6)
    cos, sin = cos.float()[:, None, None, :], sin.float()[:, None, None, :]
    keys = randn(8, kv_heads, capacity, dim, seed=3)
    values = randn(8, kv_heads, capacity, dim, seed=4)
    want_keys, want_values = keys.clone(), values.clone()

    q, k, v = qkv.view(rows, 1, heads + 2 * kv_heads, dim).split((heads, kv_heads, kv_heads), 2)
    want_q = fused.qk_norm_rope(q, q_weight, cos, sin, 1e-6)
    new_k = fused.qk_norm_rope(k, k_weight, cos, sin, 1e-5)
    slot, head = torch.arange(rows, device="cuda"), torch.arange(kv_heads, device="cuda")
    where = (slot[:, None], head[None, :], lengths[:, None])
    want_keys.index_put_(where, new_k[:, 0])
    want_values.index_put_(where, v[:, 0])

    got_q = fused_decode.qkv_into_cache(
        qkv, (q_weight, 1e-6), (k_weight, 1e-5), cos, sin, keys, values, lengths, heads
    )
    # One program per head sums its squares in another order than qk_norm_rope's 16-row blocks.
    assert_within_one_rounding(got_q, want_q[:, 0])
    assert_within_one_rounding(keys[where], want_keys[where])
    written = torch.zeros(keys.shape[:3], dtype=torch.bool, device="cuda")
    written[where] = True
    assert torch.equal(keys[~written], want_keys[~written])  # the rest of the cache untouched
    assert torch.equal(values, want_values)  # v is copied as it is
    # The comparison bites: k normed with q's weight is seen.
    wrong = randn(8, kv_heads, capacity, dim, seed=3)
    fused_decode.qkv_into_cache(
        qkv, (q_weight, 1e-6), (q_weight, 1e-5), cos, sin, wrong, values.clone(), lengths, heads
    )
    with pytest.raises(AssertionError):
        assert_within_one_rounding(wrong[where], want_keys[where])
