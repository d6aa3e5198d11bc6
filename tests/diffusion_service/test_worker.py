"""Every topology's final latents equal the single-process reference (fp32, gloo, real ranks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from bagel.diffusion.generation import ForwardGraphs
from bagel.network.kv import Branch
from bagel.pipeline import Pipeline
from diffusion_service.job import JobSpec
from diffusion_service.parallel.config import ParallelConfig
from diffusion_service.parallel.mesh import ParallelMesh
from diffusion_service.worker import JobCancelled, RankRuntime, run_job
from serving.params import GenerationParams
from tests.helpers.ranks import run_ranks

# 48x80 pixels -> 3x5 = 15 latent tokens: divisible by neither 2 nor 4.
PARAMS = GenerationParams(height=48, width=80, num_timesteps=6, seed=3, cfg_interval=(0.0, 1.0))


def _runtime(
    model_dir: str, cfg: int, ring: int, ulysses: int, graphs: ForwardGraphs | None = None
) -> tuple[RankRuntime, Pipeline]:
    pipeline = Pipeline(model_dir, "cpu")
    llm = pipeline.config.llm
    mesh = ParallelMesh.build(
        ParallelConfig(ulysses=ulysses, ring=ring, cfg_parallel=cfg),
        num_heads=llm.num_heads,
        num_kv_heads=llm.num_kv_heads,
    )
    runtime = RankRuntime(
        mesh, pipeline.model, pipeline.marker_ids, torch.device("cpu"), dist.group.WORLD, graphs
    )
    return runtime, pipeline


def _contexts(pipeline: Pipeline, with_img: bool) -> dict:
    """A negative prompt makes the CFG prefixes unequal (padding); `with_img` adds a third,
    different context as image editing would."""
    contexts = pipeline.prefill("a green apple", negative_prompt="dark")
    if with_img:
        contexts[Branch.UNCOND_IMG] = pipeline.prefill("an apple")[Branch.COND]
    return contexts


def _denoise_rank(rank, world, model_dir, cfg, ring, ulysses, with_img):
    runtime, pipeline = _runtime(model_dir, cfg, ring, ulysses)
    latents = run_job(runtime, JobSpec(1, PARAMS), _contexts(pipeline, with_img))
    return {"latents": latents} if latents is not None else {}


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> dict[bool, torch.Tensor]:
    pipeline = Pipeline(tiny_model_dir, "cpu")
    return {w: pipeline.denoise(_contexts(pipeline, w), PARAMS) for w in (False, True)}


@pytest.mark.parametrize(
    ("cfg", "ring", "ulysses"),
    [(1, 1, 2), (1, 2, 1), (1, 2, 2), (2, 1, 1), (2, 1, 2), (1, 3, 1), (1, 1, 4), (2, 2, 1)],
)
def test_parallel_latents_equal_the_single_process_reference(
    tiny_model_dir, reference, cfg, ring, ulysses
):
    world = cfg * ring * ulysses
    results = run_ranks(world, _denoise_rank, str(tiny_model_dir), cfg, ring, ulysses, False)
    expected = reference[False]
    got = results[0]["latents"]
    assert got.shape == expected.shape
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5


@pytest.mark.parametrize(("cfg", "ulysses"), [(2, 1), (3, 1), (2, 2)])
def test_three_cfg_branches_split_over_cfg_groups_equal_the_reference(
    tiny_model_dir, reference, cfg, ulysses
):
    results = run_ranks(cfg * ulysses, _denoise_rank, str(tiny_model_dir), cfg, 1, ulysses, True)
    expected = reference[True]
    got = results[0]["latents"]
    assert got.shape == expected.shape
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5


def _cancel_rank(rank, world, model_dir):
    runtime, pipeline = _runtime(model_dir, 1, 1, world)
    contexts = pipeline.prefill("a green apple")
    steps = []
    try:
        run_job(
            runtime,
            JobSpec(1, PARAMS),
            contexts,
            keep_going=lambda: len(steps) < 2,
            on_progress=lambda done, total, cached: steps.append(done),
        )
    except JobCancelled:
        return {"stopped": torch.tensor(1)}
    return {"stopped": torch.tensor(0)}


def test_rank_zero_cancel_stops_every_rank_at_the_same_step(tiny_model_dir):
    results = run_ranks(2, _cancel_rank, str(tiny_model_dir))
    assert [r["stopped"].item() for r in results] == [1, 1]


# 15 and 16 latent tokens: the same shard length (8) on 2 ranks, different pad masks.
SIZES = {"15": PARAMS, "16": GenerationParams(height=64, width=64, num_timesteps=6, seed=3)}


def _kept_captures_rank(rank, world, model_dir, ring, ulysses):
    # Kept captures (run eagerly on a CPU, through the same buffers) serve job after job, as on
    # a GPU; a capture made for one token count must not serve another of the same shard shape.
    runtime, pipeline = _runtime(model_dir, 1, ring, ulysses, ForwardGraphs())
    contexts = _contexts(pipeline, False)
    out = {}
    for i, name in enumerate(("15", "16", "15")):
        latents = run_job(runtime, JobSpec(i, SIZES[name]), contexts)
        if latents is not None:
            out[f"{name}/{i}"] = latents
    return out


@pytest.mark.parametrize(("ring", "ulysses"), [(1, 2), (2, 1)])
def test_kept_captures_serve_jobs_of_other_sizes_exactly(tiny_model_dir, ring, ulysses):
    pipeline = Pipeline(tiny_model_dir, "cpu")
    contexts = _contexts(pipeline, False)
    results = run_ranks(2, _kept_captures_rank, str(tiny_model_dir), ring, ulysses)
    assert sorted(results[0]) == ["15/0", "15/2", "16/1"]
    for key, got in results[0].items():
        expected = pipeline.denoise(contexts, SIZES[key.split("/")[0]])
        assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5, key
