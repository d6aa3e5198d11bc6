"""A whole job with FP8 attention on real gloo ranks equals the in-process pipeline with the same
setting (fp32 on the CPU, where FP8 attention is the kernel's plain-PyTorch reference).

Over a whole job the variants cannot equal the pipeline to fp32 rounding, even Ulysses, whose
attention quantizes as one process's does (`test_fp8_attention_sp.py`): a sharded forward sums
in another order, and a difference of one fp32 rounding moves a value across an e4m3 rounding
boundary, a jump of up to 2^-4 of it, which the following layers and steps carry on (a 1e-7
relative change of the attention's queries moves this job's latents by about 1e-2 of their
range). So the bound is the quantization's own size: with `E` the pipeline's FP8 error against
its exact default (bf16, fp32 on the CPU), a job's FP8 latents stay within `2 E` of the exact
ones (so within `3 E` of the pipeline's FP8 ones) and at least `E / 10` away from the exact
ones, so a job that dropped the FP8 attention fails.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from bagel.pipeline import Pipeline
from diffusion_service.job import JobSpec
from diffusion_service.parallel.config import ParallelConfig
from diffusion_service.parallel.mesh import ParallelMesh
from diffusion_service.worker import RankRuntime, run_job
from serving.params import GenerationParams
from tests.diffusion_service.test_worker import _contexts
from tests.helpers.ranks import run_ranks

# 4 x 5 latent tokens: two Ulysses shards without padding.
PARAMS = GenerationParams(height=64, width=80, num_timesteps=6, seed=3, cfg_interval=(0.0, 1.0))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _denoise_rank(rank, world, model_dir, config):
    pipeline = Pipeline(model_dir, "cpu")
    llm = pipeline.config.llm
    mesh = ParallelMesh.build(config, num_heads=llm.num_heads, num_kv_heads=llm.num_kv_heads)
    runtime = RankRuntime(
        mesh,
        pipeline.model,
        pipeline.marker_ids,
        torch.device("cpu"),
        dist.group.WORLD,
        attention_precision="fp8",
    )
    latents = run_job(runtime, JobSpec(1, PARAMS), _contexts(pipeline, False))
    return {"latents": latents} if latents is not None else {}


@pytest.fixture(scope="module")
def pipelines(tiny_model_dir) -> dict[str, torch.Tensor]:
    """The in-process latents in each attention precision."""
    latents = {}
    for precision in ("bf16", "fp8"):
        pipeline = Pipeline(tiny_model_dir, "cpu", attention_precision=precision)
        latents[precision] = pipeline.denoise(_contexts(pipeline, False), PARAMS)
    return latents


@pytest.mark.parametrize(
    "config", [ParallelConfig(ulysses=2), ParallelConfig(ring=2)], ids=["ulysses2", "ring2"]
)
def test_a_job_with_fp8_attention_stays_within_the_quantization_of_the_fp8_pipeline(
    tiny_model_dir, pipelines, config
):
    got = run_ranks(config.world_size, _denoise_rank, str(tiny_model_dir), config)[0]["latents"]
    own_error = _rel(pipelines["fp8"], pipelines["bf16"])
    assert own_error > 1e-3
    assert own_error / 10 < _rel(got, pipelines["bf16"]) < 2 * own_error
    assert _rel(got, pipelines["fp8"]) < 3 * own_error
