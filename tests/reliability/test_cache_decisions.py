"""Step caching takes the same decisions on every layout and ends with the single-process
latents and image (within 1 level), also when the CFG window closes mid-run (the conditional
branch then runs alone, and its cache state must be where it ran before) and when CFG groups
hold different subsets of the branches (editing's three branches over two groups). Real gloo
ranks, fp32 on the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bagel.diffusion.sampler import in_cfg_window, schedule
from bagel.pipeline import Pipeline
from diffusion_service.job import JobSpec
from diffusion_service.worker import run_job
from serving.params import CACHE_SPEC, GenerationParams
from step_cache.collective import make_step_cache
from tests.diffusion_service.test_worker import _contexts, _runtime
from tests.helpers.ranks import run_ranks
from tests.reliability.conftest import pixels

# 3x5 = 15 latent tokens (padded shards on 2 ranks); 12 Euler steps.
BASE = GenerationParams(height=48, width=80, num_timesteps=13, seed=5)
CLOSES = (0.6, 1.0)  # CFG for steps 0-7, the conditional branch alone for 8-11
OPEN = (0.0, 1.0)  # CFG on every step
SPECS = {
    "teacache": "teacache:threshold=0.3",
    "teacache+taylorseer": "teacache:threshold=0.3+taylorseer:order=1",
    "dbcache": "dbcache:fn=1,bn=1,warmup=2,threshold=0.3",
    "dbcache+taylorseer": "dbcache:fn=1,bn=1,warmup=2,threshold=0.3+taylorseer:order=2",
    "dbcache-forcing": "dbcache:fn=1,bn=1,warmup=2,threshold=10",  # the reported case
}
# (policy, CFG interval, with an image context): editing's third branch only where the window
# closes, where the groups' subsets differ and change mid-run.
JOBS = [(name, CLOSES, False) for name in SPECS] + [
    ("dbcache+taylorseer", OPEN, False),
    ("teacache", CLOSES, True),
    ("dbcache+taylorseer", CLOSES, True),
]
# (cfg, ring, ulysses). CFG3 gives editing's branches a group each, and text-to-image's jobs a
# group that owns no branch and only joins the decisions.
LAYOUTS = {
    "U2": (1, 1, 2),
    "R2": (1, 2, 1),
    "CFG2": (2, 1, 1),
    "CFG2xU2": (2, 1, 2),
    "CFG3": (3, 1, 1),
}


def job_id(job) -> str:
    name, interval, with_img = job
    return f"{name}/{'closes' if interval == CLOSES else 'open'}{'/edit' if with_img else ''}"


def params(job) -> GenerationParams:
    name, interval, _ = job
    return GenerationParams(
        **{**BASE.__dict__, "cache": CACHE_SPEC.parse(SPECS[name]), "cfg_interval": interval}
    )


def first_step_outside(interval) -> int:
    timesteps, _ = schedule(BASE.num_timesteps, BASE.timestep_shift)
    inside = [in_cfg_window(t, interval) for t in timesteps]
    return inside.index(False) if False in inside else len(inside)


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir: Path) -> Pipeline:
    return Pipeline(tiny_model_dir, "cpu")


def image(pipeline: Pipeline, latents: torch.Tensor) -> np.ndarray:
    return pixels(pipeline.decode(latents, BASE.height, BASE.width))


@pytest.fixture(scope="module")
def reference(pipeline: Pipeline) -> dict[str, tuple[torch.Tensor, list[int]]]:
    """Each job on one process, through the reference pipeline."""
    rows, cols = pipeline.config.latent_grid(BASE.height, BASE.width)
    out = {}
    for job in JOBS:
        p = params(job)
        cached: list[int] = []
        latents = pipeline.denoise(
            _contexts(pipeline, job[2]),
            p,
            step_cache=make_step_cache(p.cache, rows * cols, lambda x: x),
            on_step=lambda done, total, hit, cached=cached: cached.append(done - 1) if hit else 0,
        )
        out[job_id(job)] = (latents, cached)
    return out


def test_the_jobs_reuse_steps_on_both_sides_of_the_window(reference):
    """Otherwise the layouts' agreement below would prove little."""
    for job in JOBS:
        _, cached = reference[job_id(job)]
        closes = first_step_outside(job[1])
        assert any(s < closes for s in cached), job_id(job)
        if job[1] == CLOSES:
            assert closes == 8 and any(s >= closes for s in cached), (job_id(job), cached)


def _layout_rank(rank, world, model_dir, cfg, ring, ulysses):
    runtime, pipeline = _runtime(model_dir, cfg, ring, ulysses)
    out = {}
    for i, job in enumerate(JOBS):
        cached: list[int] = []
        latents = run_job(
            runtime,
            JobSpec(i + 1, params(job)),
            _contexts(pipeline, job[2]),
            on_progress=lambda done, total, hit, cached=cached: (
                cached.append(done - 1) if hit else None
            ),
        )
        out[f"cached{i}"] = torch.tensor(cached, dtype=torch.int64)
        if latents is not None:
            out[f"latents{i}"] = latents
    return out


# `make test` keeps one process and the CFG layouts (the window closing over groups, editing's
# uneven split, a group owning no branch); the sequence-parallel ones are `slow` (CI runs them).
QUICK_LAYOUTS = ("1", "CFG2", "CFG3")


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param(name, marks=() if name in QUICK_LAYOUTS else pytest.mark.slow)
        for name in ["1", *LAYOUTS]
    ],
)
def test_every_layout_takes_the_single_process_decisions_and_ends_with_its_image(
    reference, pipeline, tiny_model_dir, layout, tally
):
    cfg, ring, ulysses = LAYOUTS.get(layout, (1, 1, 1))
    with tally.cache_layout(layout):
        results = run_ranks(
            cfg * ring * ulysses, _layout_rank, str(tiny_model_dir), cfg, ring, ulysses
        )
        for i, job in enumerate(JOBS):
            expected, expected_cached = reference[job_id(job)]
            for rank, r in enumerate(results):
                assert r[f"cached{i}"].tolist() == expected_cached, (job_id(job), rank)
            got = results[0][f"latents{i}"]
            error = ((got - expected).abs().max() / expected.abs().max()).item()
            assert error <= 1e-5, (job_id(job), error)
            levels = np.abs(image(pipeline, got) - image(pipeline, expected)).max()
            assert levels <= 1, (job_id(job), levels)
