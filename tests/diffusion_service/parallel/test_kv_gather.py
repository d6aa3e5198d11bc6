"""KV all-gather SP through the whole job: final latents equal the single-process reference
(fp32, gloo, real ranks), alone, inside a Ring and beside CFG parallelism."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from bagel.pipeline import Pipeline
from diffusion_service.job import JobSpec
from diffusion_service.parallel.config import ParallelConfig
from diffusion_service.parallel.mesh import ParallelMesh
from diffusion_service.worker import RankRuntime, run_job
from tests.diffusion_service.test_worker import PARAMS, _contexts
from tests.helpers.ranks import run_ranks

LAYOUTS = {
    "kv_gather2": ParallelConfig(kv_gather=2),
    "kv_gather4": ParallelConfig(kv_gather=4),
    "ring2_kv_gather2": ParallelConfig(ring=2, kv_gather=2),
    "cfg2_kv_gather2": ParallelConfig(cfg_parallel=2, kv_gather=2),
}
COMBINED = ("ring2_kv_gather2", "cfg2_kv_gather2")


def _denoise_rank(rank, world, model_dir, config):
    pipeline = Pipeline(model_dir, "cpu")
    llm = pipeline.config.llm
    mesh = ParallelMesh.build(config, num_heads=llm.num_heads, num_kv_heads=llm.num_kv_heads)
    runtime = RankRuntime(
        mesh, pipeline.model, pipeline.marker_ids, torch.device("cpu"), dist.group.WORLD
    )
    latents = run_job(runtime, JobSpec(1, PARAMS), _contexts(pipeline, False))
    return {"latents": latents} if latents is not None else {}


@pytest.fixture(scope="module")
def expected(tiny_model_dir) -> torch.Tensor:
    pipeline = Pipeline(tiny_model_dir, "cpu")
    return pipeline.denoise(_contexts(pipeline, False), PARAMS)


# `make test` keeps the layouts that combine KV gather with another kind of parallelism; KV gather
# alone is `slow` (CI runs every layout).
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=() if name in COMBINED else pytest.mark.slow)
        for name in sorted(LAYOUTS)
    ],
)
def test_kv_gather_latents_equal_the_single_process_reference(tiny_model_dir, expected, name):
    config = LAYOUTS[name]
    results = run_ranks(config.world_size, _denoise_rank, str(tiny_model_dir), config)
    got = results[0]["latents"]
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5


def test_kv_gather_needs_no_head_split_but_excludes_ulysses():
    ParallelConfig(kv_gather=3).validate(num_heads=28, num_kv_heads=4)  # 3 divides no heads
    with pytest.raises(ValueError, match="both split the inner group"):
        ParallelConfig(ulysses=2, kv_gather=2).validate(num_heads=28, num_kv_heads=4)
    assert ParallelConfig(kv_gather=2).sp_attention_name == "kv_gather"
    assert ParallelConfig(kv_gather=2, ring=2).sp_attention_name == "kv_gather_ring"
