"""KV gather inside Ring on 2 x 2 ranks at latent token counts that leave padding: a ring block
is the contiguous inner shards it gathers, so its real rows are those shards' real rows. At 2 and
5 tokens the shards' real counts differ between the two middle shards (5: 2, 2, 1, 0), so a count
summed over strided shards (0 + 2, 1 + 3) would be wrong; 15 and 17 leave padding in the last
shard only. Both the attention (against an fp64 attention, garbage in the pad rows) and a whole
job (against the single-process pipeline) are checked."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from bagel.pipeline import Pipeline
from diffusion_service.job import JobSpec
from diffusion_service.parallel.config import ParallelConfig
from diffusion_service.parallel.kv_gather import KVGatherRingAttention
from diffusion_service.parallel.mesh import ParallelMesh
from diffusion_service.parallel.registry import make_block_attention
from diffusion_service.parallel.sharding import LatentSharding
from diffusion_service.worker import RankRuntime, run_job
from serving.params import GenerationParams
from tests.diffusion_service.parallel.reference import (
    HEADS,
    KV_HEADS,
    block_reference,
    make_block_inputs,
    relative_error,
    with_garbage_pad,
)
from tests.diffusion_service.test_worker import _contexts
from tests.helpers.ranks import run_ranks

CONFIG = ParallelConfig(ring=2, kv_gather=2)
TOKENS = (2, 5, 15, 17)
PREFIXES = (7, 4)  # CFG branches with prefixes of different lengths


def real_rows_per_ring_block(num_tokens: int, ring: int, inner: int) -> list[int]:
    """Counted from the padded sequence directly: ring block j is tokens
    [j * inner * shard_len, (j + 1) * inner * shard_len), of which those below num_tokens are
    real."""
    shard_len = -(-num_tokens // (ring * inner))
    block = inner * shard_len
    return [max(0, min(block, num_tokens - j * block)) for j in range(ring)]


def test_the_strided_and_contiguous_counts_differ_at_the_small_sizes():
    """Otherwise this file could not catch a strided count."""
    for n in (2, 5):
        s = LatentSharding(n, 4, 0)
        strided = [sum(s.valid_len(i * 2 + j) for i in range(2)) for j in range(2)]
        assert strided != real_rows_per_ring_block(n, 2, 2), n


def _attention_rank(rank: int, world: int) -> dict:
    mesh = ParallelMesh.build(CONFIG, num_heads=HEADS, num_kv_heads=KV_HEADS)
    out = {}
    for case, n in enumerate(TOKENS):
        x = make_block_inputs(case, PREFIXES, n)
        sharding = mesh.latent_sharding(n)
        q, k, v = (
            sharding.shard(with_garbage_pad(t, sharding.padded_len, case + i))
            for i, t in enumerate((x.latent_q, x.latent_k, x.latent_v))
        )
        attn = make_block_attention(mesh, sharding)
        assert isinstance(attn, KVGatherRingAttention)
        out[f"{n}/block_valid"] = torch.tensor(attn.block_valid)
        out[f"{n}/joint"], out[f"{n}/latent"] = attn(replace(x, latent_q=q, latent_k=k, latent_v=v))
    return out


def test_kv_gather_inside_ring_with_padding_equals_fp64_attention():
    results = run_ranks(CONFIG.world_size, _attention_rank)
    for case, n in enumerate(TOKENS):
        ref_joint, ref_latent, _, _ = block_reference(make_block_inputs(case, PREFIXES, n))
        for r in results:
            assert r[f"{n}/block_valid"].tolist() == real_rows_per_ring_block(n, 2, 2), n
            assert relative_error(r[f"{n}/joint"], ref_joint) < 1e-6, n
        latent = torch.cat([r[f"{n}/latent"] for r in results], dim=1)[:, :n]
        assert relative_error(latent, ref_latent) < 1e-6, n


# 16x80 px: 1x5 latent tokens; 16x272 px: 1x17; 48x80 px: 3x5 = 15.
JOBS = {
    n: GenerationParams(height=h, width=w, num_timesteps=4, seed=n, cfg_interval=(0.0, 1.0))
    for n, (h, w) in {5: (16, 80), 15: (48, 80), 17: (16, 272)}.items()
}


def _job_rank(rank: int, world: int, model_dir: str) -> dict:
    pipeline = Pipeline(model_dir, "cpu")
    llm = pipeline.config.llm
    mesh = ParallelMesh.build(CONFIG, num_heads=llm.num_heads, num_kv_heads=llm.num_kv_heads)
    runtime = RankRuntime(
        mesh, pipeline.model, pipeline.marker_ids, torch.device("cpu"), dist.group.WORLD
    )
    out = {}
    for n, params in JOBS.items():
        latents = run_job(runtime, JobSpec(n, params), _contexts(pipeline, False))
        if latents is not None:
            out[str(n)] = latents
    return out


def test_a_job_on_kv_gather_inside_ring_with_padding_equals_the_single_process_latents(
    tiny_model_dir,
):
    pipeline = Pipeline(tiny_model_dir, "cpu")
    results = run_ranks(CONFIG.world_size, _job_rank, str(tiny_model_dir))
    for n, params in JOBS.items():
        rows, cols = pipeline.config.latent_grid(params.height, params.width)
        assert rows * cols == n
        expected = pipeline.denoise(_contexts(pipeline, False), params)
        got = results[0][str(n)]
        error = ((got - expected).abs().max() / expected.abs().max()).item()
        assert error < 1e-5, (n, error)
