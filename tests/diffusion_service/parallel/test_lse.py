"""attention_with_lse and merge_attention against a plain fp64 attention: the explicit (CPU)
path, then the fused (CUDA, half precision) path run on CPU against stand-in kernels, so the
layout changes, the cuDNN bias and the empty-row handling around the kernels are checked where
mutation testing runs.

The stand-ins are registered as the CPU kernels of the two aten ops the fused path calls and
follow their CUDA contracts: `[B, H, L, D]` inputs with GQA KV heads as they are, output in the
input dtype, an fp32 LSE `[B, H, Lq]` (flash) or `[B, H, Lq, 1]` (cuDNN), cuDNN's `attn_bias`
added to the scores, NaN for a row with no real key. The real kernels are checked on a GPU by
`test_lse_cuda.py`."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion_service.parallel import lse
from diffusion_service.parallel.lse import (
    _explicit_attention_with_lse,
    _fused_attention_with_lse,
    attention_with_lse,
    merge_attention,
)
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


# ---- the fused path, on CPU stand-ins for the CUDA kernels ------------------------------------

BATCH, Q_LEN, K_LEN = 2, 5, 7
HALF_TOL = 2e-2  # bf16 inputs and output


def _attend(q, k, v, bias):
    """fp64 attention of `[B, H, L, D]` tensors; returns (out in q's dtype, fp32 lse)."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias.double()
    lse_ = torch.logsumexp(scores, dim=-1)
    out = torch.softmax(scores, dim=-1) @ v  # NaN where every key is masked, as the kernels
    return out.to(q.dtype), lse_.float()


def _rest(q, k):
    empty = q.new_empty(0)
    return empty, empty, q.shape[2], k.shape[2], empty, empty, empty


CALLS: list[str] = []  # the stand-in kernels run, in order


def _flash(q, k, v, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
    assert (dropout_p, is_causal, scale) == (0.0, False, None)
    assert k.dtype == v.dtype == q.dtype
    CALLS.append("flash")
    out, lse_ = _attend(q, k, v, None)
    return out, lse_, *_rest(q, k)


def _cudnn(q, k, v, attn_bias, compute_log_sumexp, dropout_p=0.0, is_causal=False,
           return_debug_mask=False, *, scale=None):  # fmt: skip
    assert compute_log_sumexp and (dropout_p, is_causal, scale) == (0.0, False, None)
    assert k.dtype == v.dtype == q.dtype
    CALLS.append("cudnn")
    if attn_bias is not None:
        assert attn_bias.shape == (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        assert attn_bias.dtype == q.dtype
    out, lse_ = _attend(q, k, v, attn_bias)
    return out, lse_.unsqueeze(-1), *_rest(q, k)


@pytest.fixture(scope="module")
def cpu_kernels():
    library = torch.library.Library("aten", "IMPL")
    library.impl("_scaled_dot_product_flash_attention", _flash, "CPU")
    library.impl("_scaled_dot_product_cudnn_attention", _cudnn, "CPU")
    yield
    library._destroy()


@pytest.fixture(params=[True, False], ids=["cudnn", "flash"])
def kernel(request, cpu_kernels, monkeypatch):
    def use_cudnn(q: torch.Tensor) -> bool:
        assert q.dtype == torch.bfloat16
        return request.param

    monkeypatch.setattr(lse, "_use_cudnn", use_cudnn)
    CALLS.clear()
    return request.param


def _inputs(seed: int, mask_rows: tuple[int, ...] | None = None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, Q_LEN, HEADS, HEAD_DIM, generator=gen).bfloat16()
    k = torch.randn(BATCH, K_LEN, KV_HEADS, HEAD_DIM, generator=gen).bfloat16()
    v = torch.randn(BATCH, K_LEN, KV_HEADS, HEAD_DIM, generator=gen).bfloat16()
    mask = None
    if mask_rows is not None:
        mask = torch.ones(BATCH, K_LEN, dtype=torch.bool)
        for b, real in enumerate(mask_rows):
            mask[b, real:] = False
    return q, k, v, mask


def test_the_fused_path_without_a_mask_equals_fp64_attention(kernel):
    q, k, v, _ = _inputs(0)
    out, lse_ = _fused_attention_with_lse(q, k, v, None)
    ref_out, ref_lse = reference_attention(q, k, v)
    assert out.dtype == lse_.dtype == torch.float32
    assert out.shape == (BATCH, Q_LEN, HEADS, HEAD_DIM) and lse_.shape == (BATCH, Q_LEN, HEADS)
    assert relative_error(out, ref_out) < HALF_TOL
    assert relative_error(lse_, ref_lse) < HALF_TOL


def test_the_fused_path_with_a_key_mask_equals_fp64_attention(kernel):
    q, k, v, mask = _inputs(1, mask_rows=(3, 6))
    out, lse_ = _fused_attention_with_lse(q, k, v, mask)
    ref_out, ref_lse = reference_attention(q, k, v, mask)
    assert out.dtype == lse_.dtype == torch.float32
    assert lse_.shape == (BATCH, Q_LEN, HEADS)
    assert relative_error(out, ref_out) < HALF_TOL
    assert relative_error(lse_, ref_lse) < HALF_TOL


def test_flash_takes_no_mask_so_a_masked_block_is_attended_explicitly(cpu_kernels, monkeypatch):
    monkeypatch.setattr(lse, "_use_cudnn", lambda q: False)
    q, k, v, mask = _inputs(2, mask_rows=(2, 7))
    fused = _fused_attention_with_lse(q, k, v, mask)
    explicit = _explicit_attention_with_lse(q, k, v, mask)
    assert torch.equal(fused[0], explicit[0]) and torch.equal(fused[1], explicit[1])


def test_cudnn_gives_a_row_without_a_real_key_zero_output_and_minus_inf(cpu_kernels, monkeypatch):
    monkeypatch.setattr(lse, "_use_cudnn", lambda q: True)
    q, k, v, mask = _inputs(3, mask_rows=(0, 4))
    out, lse_ = _fused_attention_with_lse(q, k, v, mask)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(lse_[0], torch.full_like(lse_[0], float("-inf")))
    ref_out, ref_lse = reference_attention(q[1:], k[1:], v[1:], mask[1:])
    assert relative_error(out[1:], ref_out) < HALF_TOL
    assert relative_error(lse_[1:], ref_lse) < HALF_TOL
    assert not out.isnan().any()


def test_fp32_keys_are_cast_to_the_query_dtype_for_the_kernel(kernel):
    q, k, v, _ = _inputs(4)
    out, lse_ = _fused_attention_with_lse(q, k.float(), v.float(), None)
    ref = _fused_attention_with_lse(q, k, v, None)
    assert torch.equal(out, ref[0]) and torch.equal(lse_, ref[1])


@pytest.mark.parametrize(
    "available, enabled, capability, expected",
    [
        (True, True, (8, 0), True),
        (True, True, (9, 0), True),
        (True, True, (7, 5), False),
        (False, True, (9, 0), False),
        (True, False, (9, 0), False),
    ],
)
def test_cudnn_is_used_where_available_enabled_and_sm80_or_newer(
    monkeypatch, available, enabled, capability, expected
):
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: available)
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: enabled)
    asked = []
    monkeypatch.setattr(
        torch.cuda, "get_device_capability", lambda device: asked.append(device) or capability
    )
    q = torch.zeros(1, 1, 1, 8)
    assert lse._use_cudnn(q) is expected
    assert asked in ([], [q.device])


def test_each_path_runs_its_kernel_and_flash_leaves_a_masked_block_to_the_explicit_path(kernel):
    q, k, v, mask = _inputs(5, mask_rows=(3, 7))
    _fused_attention_with_lse(q, k, v, None)
    _fused_attention_with_lse(q, k, v, mask)
    assert (["cudnn", "cudnn"] if kernel else ["flash"]) == CALLS


def test_a_half_precision_query_on_cuda_takes_the_fused_path(kernel, monkeypatch):
    monkeypatch.setattr(lse, "_fused_applies", lambda q: q.dtype == torch.bfloat16)
    q, k, v, mask = _inputs(6, mask_rows=(2, 6))
    out, lse_ = attention_with_lse(q, k, v, mask)
    ref_out, ref_lse = reference_attention(q, k, v, mask)
    assert relative_error(out, ref_out) < HALF_TOL
    assert relative_error(lse_, ref_lse) < HALF_TOL
    assert (["cudnn"] if kernel else []) == CALLS  # flash takes no mask: explicit instead
    attention_with_lse(q, k, v)
    assert CALLS[-1] == ("cudnn" if kernel else "flash")


def test_an_empty_key_block_of_half_inputs_is_fp32_zero_and_minus_inf():
    q = torch.ones(2, 3, HEADS, HEAD_DIM, dtype=torch.bfloat16)
    k = torch.ones(2, 0, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16)
    out, lse_ = attention_with_lse(q, k, k)
    assert out.dtype == lse_.dtype == torch.float32
    assert torch.equal(out, torch.zeros(2, 3, HEADS, HEAD_DIM))
    assert torch.equal(lse_, torch.full((2, 3, HEADS), float("-inf")))


class _Query:
    """What `_fused_applies` reads of a tensor: a CUDA tensor needs no GPU to describe."""

    def __init__(self, device: str, dtype: torch.dtype, head_dim: int) -> None:
        self.device = torch.device(device) if device == "cpu" else type("D", (), {"type": device})
        self.dtype = dtype
        self.shape = (1, 3, 5, head_dim)


@pytest.mark.parametrize(
    "device, dtype, head_dim, fused",
    [
        ("cuda", torch.bfloat16, 128, True),
        ("cuda", torch.float16, 64, True),
        ("cuda", torch.bfloat16, 8, True),
        ("cuda", torch.bfloat16, 136, False),
        ("cuda", torch.bfloat16, 12, False),
        ("cuda", torch.float32, 128, False),
        ("cpu", torch.bfloat16, 128, False),
    ],
)
def test_the_fused_kernels_take_half_precision_head_dims_in_eights_up_to_128_on_cuda(
    device, dtype, head_dim, fused
):
    assert lse._fused_applies(_Query(device, dtype, head_dim)) is fused
