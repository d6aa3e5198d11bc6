"""`attention_precision="fp8"` on a GPU: the generation block's attention runs the Triton FP8
kernel, which gives what its plain-PyTorch reference (`BAGEL_FP8_ATTENTION_KERNEL=0`) gives, at
BAGEL-7B's attention shapes and through a whole generation. Skipped without a GPU that has FP8
tensor cores.

Through a generation the kernel and the reference cannot agree to rounding: they sum in other
orders, a difference of one rounding moves a value across an e4m3 rounding boundary, and the
layers and steps after carry that on. So the image bound is relative to the quantization's own
size: the kernel's image is about as close to the reference's as the reference's is to the bf16
image (within 3 dB), and at least 20 dB from noise.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bagel import envs
from bagel.kernels import fp8_attention as fa
from bagel.network.attention import BlockQKV, block_attention
from bagel.pipeline import Pipeline
from bagel.testing.tiny import write_tiny_checkpoint
from serving.params import GenerationParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not fa.available(), reason="needs Triton and a CUDA GPU with FP8 (sm_89+)"),
]

PARAMS = GenerationParams(height=256, width=256, num_timesteps=12, seed=5)


def psnr_db(got: np.ndarray | torch.Tensor, want: np.ndarray | torch.Tensor) -> float:
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    rms = (got - want).pow(2).mean().sqrt().item()
    return 20 * math.log10(want.abs().max().item() / max(rms, 1e-30))


@pytest.fixture
def kernel_calls(monkeypatch) -> list[int]:
    """Counts the Triton kernel's calls."""
    calls: list[int] = []
    kernel = fa.fp8_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(fa, "fp8_attention", counted)
    return calls


def _block(seed: int, prefix: int, latents: int, mask: bool) -> BlockQKV:
    """BAGEL-7B's block: 28 query heads over 4 KV heads of 128, 2 markers."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(length: int, heads: int) -> torch.Tensor:
        return torch.randn(2, length, heads, 128, generator=gen, device="cuda").bfloat16()

    key_mask = None
    if mask:
        key_mask = torch.ones(2, prefix + 2, dtype=torch.bool, device="cuda")
        key_mask[0, prefix - 9 : prefix] = False
    return BlockQKV(
        randn(2, 28), randn(prefix + 2, 4), randn(prefix + 2, 4), key_mask,
        randn(latents, 28), randn(latents, 4), randn(latents, 4),
    )  # fmt: skip


@pytest.mark.parametrize("mask", [False, True])
def test_the_kernel_block_attention_equals_the_reference_at_bagel_shapes(
    monkeypatch, kernel_calls, mask
):
    x = _block(0, prefix=61, latents=1024, mask=mask)
    attention = block_attention("fp8")
    joint, latent = attention(x)
    assert kernel_calls and joint.dtype == latent.dtype == torch.bfloat16
    monkeypatch.setenv(envs.FP8_ATTENTION_KERNEL, "0")
    calls = len(kernel_calls)
    want_joint, want_latent = attention(x)
    assert len(kernel_calls) == calls  # the switch sends it to the reference
    assert psnr_db(latent.float(), want_latent.float()) > 40.0
    assert psnr_db(joint.float(), want_joint.float()) > 40.0
    exact = block_attention("bf16")(x)[1]
    assert psnr_db(latent.float(), exact.float()) < psnr_db(want_latent.float(), exact.float()) + 3


@pytest.fixture(scope="module")
def wide_heads_model(tmp_path_factory) -> Path:
    """The tiny checkpoint with 2 query heads over 1 KV head of 64: the kernel's head dims."""
    directory = tmp_path_factory.mktemp("tiny-bagel-d64")
    write_tiny_checkpoint(directory, seed=0, num_heads=2, num_kv_heads=1)
    return directory


def _image(model_dir: Path, precision: str) -> np.ndarray:
    pipeline = Pipeline(model_dir, "cuda", attention_precision=precision)
    return np.asarray(pipeline.generate("a red circle", PARAMS).image, dtype=np.float64)


def test_a_generation_with_the_kernel_gives_the_references_image(
    monkeypatch, kernel_calls, wide_heads_model
):
    kernel = _image(wide_heads_model, "fp8")
    assert kernel_calls
    monkeypatch.setenv(envs.FP8_ATTENTION_KERNEL, "0")
    calls = len(kernel_calls)
    reference = _image(wide_heads_model, "fp8")
    assert len(kernel_calls) == calls
    bf16 = _image(wide_heads_model, "bf16")
    quantization_db = psnr_db(reference, bf16)
    assert psnr_db(kernel, reference) > min(quantization_db - 3, 40.0)
    assert psnr_db(kernel, bf16) > quantization_db - 3
    assert psnr_db(kernel, reference) > 20.0
