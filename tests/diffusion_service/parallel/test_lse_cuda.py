"""The fused CUDA paths of attention_with_lse (cuDNN, and the flash op it falls back to), in
bf16, against fp64; skipped on CPU."""

from __future__ import annotations

import pytest
import torch

from diffusion_service.parallel import lse as lse_module
from diffusion_service.parallel.lse import attention_with_lse, merge_attention
from tests.diffusion_service.parallel.reference import reference_attention, relative_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

# bf16 operands: the fused kernel rounds P to bf16 before P @ V, so ~1e-2 relative, not 1e-6.
TOL = 1e-2


@pytest.fixture(params=["cudnn", "flash"], autouse=True)
def kernel(request, monkeypatch):
    """Run every test once with cuDNN and once as on a GPU without it."""
    if request.param == "flash":
        monkeypatch.setattr(lse_module, "_use_cudnn", lambda q: False)
    return request.param


def _qkv(seed: int, q_len: int, k_len: int, heads: int = 28, kv_heads: int = 4, dim: int = 128):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda").bfloat16()

    return (
        randn(2, q_len, heads, dim),
        randn(2, k_len, kv_heads, dim),
        randn(2, k_len, kv_heads, dim),
    )


def test_fused_path_matches_fp64_with_gqa():
    q, k, v = _qkv(0, 300, 517)
    out, lse = attention_with_lse(q, k, v)
    ref_out, ref_lse = reference_attention(q.cpu(), k.cpu(), v.cpu())
    assert out.dtype == lse.dtype == torch.float32
    assert relative_error(out.cpu(), ref_out) < TOL
    assert relative_error(lse.cpu(), ref_lse) < 1e-3  # the LSE itself is accumulated in fp32


def test_fused_blocks_merge_to_full_attention():
    q, k, v = _qkv(1, 300, 517)
    first = attention_with_lse(q, k[:, :200], v[:, :200])
    out, lse = merge_attention(*first, *attention_with_lse(q, k[:, 200:], v[:, 200:]))
    ref_out, ref_lse = reference_attention(q.cpu(), k.cpu(), v.cpu())
    assert relative_error(out.cpu(), ref_out) < TOL
    assert relative_error(lse.cpu(), ref_lse) < 1e-3


def test_masked_block_matches_fp64_and_a_row_without_keys_is_empty():
    q, k, v = _qkv(2, 64, 40)
    mask = torch.ones(2, 40, dtype=torch.bool, device="cuda")
    mask[0, 10:30] = False
    mask[1] = False
    out, lse = attention_with_lse(q, k, v, mask)
    ref_out, ref_lse = reference_attention(q[:1].cpu(), k[:1].cpu(), v[:1].cpu(), mask[:1].cpu())
    assert relative_error(out[:1].cpu(), ref_out) < TOL
    assert relative_error(lse[:1].cpu(), ref_lse) < 1e-3
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()
