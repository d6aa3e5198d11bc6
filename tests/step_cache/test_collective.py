"""The step-cache runtime with the tiny model: threshold 0 changes nothing, a positive threshold
reuses steps and stays close, and ranks whose own statistics disagree still decide together.
Every layout's decisions against one process: `tests/reliability/test_cache_decisions.py`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bagel.network.kv import Branch
from bagel.pipeline import Pipeline
from serving.params import DBCache, GenerationParams, NoCache, TeaCache
from step_cache.collective import CollectiveStepCache, make_step_cache, world_sum
from tests.diffusion_service.test_worker import _contexts
from tests.helpers.ranks import run_ranks

# 15 latent tokens (padded shards), 12 Euler steps, CFG on every step.
BASE = GenerationParams(height=48, width=80, num_timesteps=13, seed=5, cfg_interval=(0.0, 1.0))
POLICIES = {
    "teacache": TeaCache(rel_l1_threshold=0.3),
    "dbcache": DBCache(fn_compute_blocks=1, max_warmup_steps=2, residual_diff_threshold=0.3),
    "dbcache+taylorseer": DBCache(
        fn_compute_blocks=1, max_warmup_steps=2, residual_diff_threshold=0.3, taylorseer_order=2
    ),
}
ZERO = {
    "teacache": TeaCache(rel_l1_threshold=0.0),
    "dbcache": DBCache(fn_compute_blocks=1, max_warmup_steps=0, residual_diff_threshold=0.0),
}


def _params(policy) -> GenerationParams:
    return GenerationParams(**{**BASE.__dict__, "cache": policy})


def _single_process(model_dir: Path, policy, with_img: bool = False):
    pipeline = Pipeline(model_dir, "cpu")
    contexts = _contexts(pipeline, with_img)
    rows, cols = pipeline.config.latent_grid(BASE.height, BASE.width)
    cache = make_step_cache(policy, rows * cols, world_sum())
    cached: list[int] = []
    latents = pipeline.denoise(
        contexts,
        _params(policy),
        step_cache=cache,
        on_step=lambda done, total, hit: cached.append(done - 1) if hit else None,
    )
    return latents, cached


@pytest.mark.parametrize("name", sorted(ZERO))
def test_threshold_zero_is_bit_identical_to_no_cache(tiny_model_dir, name):
    uncached, _ = _single_process(tiny_model_dir, NoCache())
    latents, cached = _single_process(tiny_model_dir, ZERO[name])
    assert cached == []
    assert torch.equal(latents, uncached)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_a_positive_threshold_reuses_steps_and_stays_close(tiny_model_dir, name):
    uncached, _ = _single_process(tiny_model_dir, NoCache())
    latents, cached = _single_process(tiny_model_dir, POLICIES[name])
    assert cached, "the policy never reused a step"
    if name == "teacache":  # the first and the last step always compute
        assert 0 not in cached and 11 not in cached
    err = ((latents - uncached).abs().max() / uncached.abs().max()).item()
    assert 0 < err < 0.5


def _perturbed_rank(rank, world):
    """Rank 1's Fn residual changes a lot, rank 0's not at all: alone, rank 0 would reuse."""
    cache = CollectiveStepCache(
        DBCache(fn_compute_blocks=1, max_warmup_steps=0, residual_diff_threshold=0.1),
        valid_rows=4,
        reduce=world_sum(),
    )
    decisions = []
    front_in = (torch.zeros(1, 2, 8), torch.zeros(1, 4, 8))
    for step in range(4):
        cache.begin_step(step, 4, (Branch.COND,))
        scale = 1.0 if rank == 0 or step < 2 else 5.0 * step
        front_out = (torch.zeros(1, 2, 8), torch.full((1, 4, 8), scale))
        reuse = cache.reuse_middle((Branch.COND,), front_in, front_out)
        if not reuse:
            cache.store_middle_residual((Branch.COND,), (torch.ones(1, 2, 8), torch.ones(1, 4, 8)))
        decisions.append(int(reuse))
    return {"decisions": torch.tensor(decisions)}


def test_ranks_agree_when_one_rank_alone_would_decide_otherwise():
    results = run_ranks(2, _perturbed_rank)
    decisions = [r["decisions"].tolist() for r in results]
    # Step 0 has no state, step 1 sees no change; steps 2 and 3 see rank 1's jump everywhere.
    assert decisions == [[0, 1, 0, 0], [0, 1, 0, 0]]
