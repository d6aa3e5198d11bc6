"""The in-process reference pipeline: determinism, CFG branch reuse, and its output."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from bagel.kv import Branch
from bagel.pipeline import Pipeline
from serving.params import GenerationParams

PARAMS = GenerationParams(height=64, width=96, num_timesteps=8, seed=7)


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir: Path) -> Pipeline:
    return Pipeline(tiny_model_dir, "cpu")


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_same_seed_gives_the_same_png_bytes_and_another_seed_another_image(pipeline):
    a = pipeline.generate("a cat", PARAMS)
    b = pipeline.generate("a cat", PARAMS)
    c = pipeline.generate("a cat", GenerationParams(**{**PARAMS.__dict__, "seed": 8}))
    assert a.image.size == (96, 64)
    assert png_bytes(a.image) == png_bytes(b.image)
    assert png_bytes(a.image) != png_bytes(c.image)
    assert (a.latents - c.latents).abs().max() > 0.1


def test_reusing_the_conditional_velocity_for_cfg_img_is_bit_identical(pipeline):
    contexts = pipeline.prefill("a red bicycle")
    reused = pipeline.denoise(contexts, PARAMS, batch_branches=False)
    computed = pipeline.denoise(
        {**contexts, Branch.UNCOND_IMG: contexts[Branch.COND]}, PARAMS, batch_branches=False
    )
    assert torch.equal(reused, computed)


def test_batched_cfg_branches_match_unbatched_latents(pipeline):
    contexts = pipeline.prefill("a mountain lake")
    batched = pipeline.denoise(contexts, PARAMS, batch_branches=True)
    single = pipeline.denoise(contexts, PARAMS, batch_branches=False)
    assert ((batched - single).abs().max() / single.abs().max()) < 1e-6


def test_negative_prompt_changes_the_unconditional_context(pipeline):
    plain = pipeline.prefill("a dog")
    negative = pipeline.prefill("a dog", negative_prompt="blurry")
    assert plain[Branch.UNCOND_TEXT].num_tokens == 0
    assert negative[Branch.UNCOND_TEXT].num_tokens > 2
    a = pipeline.denoise(plain, PARAMS)
    b = pipeline.denoise(negative, PARAMS)
    assert (a - b).abs().max() > 1e-3
