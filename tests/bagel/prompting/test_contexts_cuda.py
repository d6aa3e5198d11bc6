"""An edit's contexts on CUDA in bf16 (fused kernels on the mixed-expert layers) against the same
contexts in fp64 on the CPU (GPU only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bagel.checkpoints.checkpoint import load_autoencoder, load_bagel, load_vit
from bagel.prompting.contexts import ContextEncoder, EditResize, edit_segments, prepare_edit_image
from bagel.prompting.image_transforms import ResizeRule
from bagel.text.tokenizer import load_tokenizer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
RULES = EditResize(ResizeRule(256, 128, 16), ResizeRule(224, 112, 14))


def encoder(model_dir: Path, dtype: torch.dtype, device: str) -> ContextEncoder:
    return ContextEncoder(
        load_bagel(model_dir, "diffusion", dtype=dtype, device=device),
        load_vit(model_dir, dtype=dtype, device=device),
        load_autoencoder(model_dir, dtype=dtype, device=device),
        load_tokenizer(model_dir),
    )


def test_bf16_edit_contexts_on_cuda_match_fp64_on_the_cpu(tiny_model_dir: Path):
    rng = np.random.default_rng(0)
    image = prepare_edit_image(
        Image.fromarray(rng.integers(0, 256, (150, 210, 3), dtype=np.uint8)), RULES
    )
    tok = load_tokenizer(tiny_model_dir)
    segments = edit_segments(
        image.segments(load_bagel(tiny_model_dir, "prefill").config),
        tok.encode_prompt("make it blue"),
        [],
    )
    expected = encoder(tiny_model_dir, torch.float64, "cpu").prefill(segments, image)
    got = encoder(tiny_model_dir, torch.bfloat16, "cuda").prefill(segments, image)
    for branch, want in expected.items():
        for layer in range(len(want.keys)):
            for a, b in ((got[branch].keys[layer], want.keys[layer]),
                         (got[branch].values[layer], want.values[layer])):  # fmt: skip
                err = (a.double().cpu() - b).abs().max() / b.abs().max()
                assert err < 3e-2, (branch, layer, err.item())
