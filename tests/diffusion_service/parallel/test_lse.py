"""attention_with_lse and merge_attention against a plain fp64 attention (CPU, explicit path)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion_service.parallel.lse import attention_with_lse, merge_attention
from tests.diffusion_service.parallel.reference import (
    HEAD_DIM,
    HEADS,
    KV_HEADS,
    reference_attention,
    relative_error,
)

TOL = 1e-6


def _qkv(seed: int, batch: int = 2, q_len: int = 11, k_len: int = 29):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_len, HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(batch, k_len, KV_HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(batch, k_len, KV_HEADS, HEAD_DIM, generator=gen)
    return q, k, v


def test_attention_with_lse_matches_fp64_with_gqa_and_mask():
    q, k, v = _qkv(0)
    mask = torch.rand(2, 29, generator=torch.Generator().manual_seed(1)) > 0.3
    out, lse = attention_with_lse(q, k, v, mask)
    ref_out, ref_lse = reference_attention(q, k, v, mask)
    assert out.dtype == lse.dtype == torch.float32
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    assert relative_error(out, ref_out) < TOL
    assert relative_error(lse, ref_lse) < TOL


def test_attention_with_lse_accumulates_half_inputs_in_fp32():
    q, k, v = (t.bfloat16() for t in _qkv(2))
    out, lse = attention_with_lse(q, k, v)
    ref_out, ref_lse = reference_attention(q, k, v)  # same bf16-rounded inputs
    assert out.dtype == torch.float32
    assert relative_error(out, ref_out) < TOL
    assert relative_error(lse, ref_lse) < TOL


@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(0, 29), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_merging_split_key_blocks_equals_full_attention(cuts, seed):
    q, k, v = _qkv(seed)
    bounds = [0, *sorted(cuts), 29]  # repeated cuts give empty blocks
    out = lse = None
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        block = attention_with_lse(q, k[:, lo:hi], v[:, lo:hi])
        out, lse = block if out is None else merge_attention(out, lse, *block)
    ref_out, ref_lse = reference_attention(q, k, v)
    assert relative_error(out, ref_out) < TOL
    assert relative_error(lse, ref_lse) < TOL


def test_fully_masked_block_gives_zero_and_minus_inf_and_merges_without_nan():
    q, k, v = _qkv(3)
    none_real = torch.zeros(2, 29, dtype=torch.bool)
    masked_out, masked_lse = attention_with_lse(q, k, v, none_real)
    assert torch.equal(masked_out, torch.zeros_like(masked_out))
    assert torch.isneginf(masked_lse).all()

    # Masked block first, then a real one, then masked again: the result is the real block.
    real_out, real_lse = attention_with_lse(q, k, v)
    out, lse = merge_attention(masked_out, masked_lse, real_out, real_lse)
    out, lse = merge_attention(out, lse, masked_out, masked_lse)
    ref_out, ref_lse = reference_attention(q, k, v)
    assert relative_error(out, ref_out) < TOL
    assert relative_error(lse, ref_lse) < TOL

    # Two blocks that both saw nothing stay "nothing", with no NaN.
    out, lse = merge_attention(masked_out, masked_lse, masked_out, masked_lse)
    assert not out.isnan().any() and torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()


def test_rows_with_some_masked_keys_per_batch_row_match_fp64():
    # Row 0 sees every key, row 1 only the first three: per-row masks must not mix.
    q, k, v = _qkv(4)
    mask = torch.ones(2, 29, dtype=torch.bool)
    mask[1, 3:] = False
    out, lse = attention_with_lse(q, k, v, mask)
    ref_out, ref_lse = reference_attention(q, k, v, mask)
    assert relative_error(out, ref_out) < TOL
    assert relative_error(lse, ref_lse) < TOL


def test_empty_key_block_is_neutral_under_merge():
    q, k, v = _qkv(5)
    empty = attention_with_lse(q, k[:, :0], v[:, :0])
    full = attention_with_lse(q, k, v)
    out, lse = merge_attention(*empty, *full)
    assert torch.equal(out, full[0]) and torch.equal(lse, full[1])
