"""Ulysses, Ring and hybrid attention on real gloo processes equal a plain fp64 attention.

Every rank builds the same full inputs from a seed, keeps its latent shard (pad filled with
large garbage, which must never be read as a key), runs the registry's attention, and returns
its outputs; the parent reassembles the shards and compares with the fp64 reference.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from bagel.network.attention import BlockQKV, full_block_attention
from diffusion_service.parallel import registry
from diffusion_service.parallel.config import ParallelConfig
from diffusion_service.parallel.kv_gather import KVGatherRingAttention
from diffusion_service.parallel.mesh import ParallelMesh
from diffusion_service.parallel.registry import SPAttention, make_block_attention
from diffusion_service.parallel.ring import RingAttention
from diffusion_service.parallel.sharding import LatentSharding
from diffusion_service.parallel.usp import UnifiedSequenceAttention
from tests.diffusion_service.parallel.reference import (
    HEADS,
    KV_HEADS,
    block_reference,
    make_block_inputs,
    relative_error,
    with_garbage_pad,
)
from tests.helpers.ranks import run_ranks

TOL = 1e-6

# (prefix length per batch row, latent tokens). (0, 0): only the two marker keys; (7, 4): CFG
# branches with prefixes of different lengths, so a joint key mask; 3 tokens over 4 ranks leaves
# a shard made only of padding; 13 and 37 divide none of the degrees.
CASES = [
    ((0, 0), 13),
    ((0, 0), 37),
    ((7, 4), 13),
    ((7, 4), 37),
    ((7, 7), 37),
    ((7, 4), 3),
]

TOPOLOGIES = {
    "ulysses2": ParallelConfig(ulysses=2),
    "ulysses4": ParallelConfig(ulysses=4),
    "ring2": ParallelConfig(ring=2),
    "ring3": ParallelConfig(ring=3),
    "ring4": ParallelConfig(ring=4),
    "ring2_ulysses2": ParallelConfig(ring=2, ulysses=2),
    "cfg2_ulysses2": ParallelConfig(cfg_parallel=2, ulysses=2),
    "kv_gather2": ParallelConfig(kv_gather=2),
    "kv_gather3": ParallelConfig(kv_gather=3),
    "ring2_kv_gather2": ParallelConfig(ring=2, kv_gather=2),
    "cfg2_kv_gather2": ParallelConfig(cfg_parallel=2, kv_gather=2),
}


def _seed(cfg_rank: int, case: int) -> int:
    # Each CFG group gets its own inputs, so groups that talked to each other would show.
    return 1000 * cfg_rank + case


def _sp_rank(rank: int, world: int, config: ParallelConfig) -> dict:
    mesh = ParallelMesh.build(config, num_heads=HEADS, num_kv_heads=KV_HEADS)
    results = {}
    for case, (prefix_lens, num_latent) in enumerate(CASES):
        seed = _seed(mesh.cfg_rank, case)
        x = make_block_inputs(seed, prefix_lens, num_latent)
        sharding = mesh.latent_sharding(num_latent)
        latent_q, latent_k, latent_v = (
            sharding.shard(with_garbage_pad(t, sharding.padded_len, seed + i))
            for i, t in enumerate((x.latent_q, x.latent_k, x.latent_v))
        )
        qkv = replace(x, latent_q=latent_q, latent_k=latent_k, latent_v=latent_v)
        attn = make_block_attention(mesh, sharding)
        results[f"{case}/joint"], results[f"{case}/latent"] = attn(qkv)
        if isinstance(attn, RingAttention):
            _, results[f"{case}/lse"] = attn.attend_with_lse(qkv)
    return results


def _check_against_reference(config: ParallelConfig, tol: float) -> None:
    sp = config.sp_degree
    results = run_ranks(config.world_size, _sp_rank, config)
    for cfg_rank in range(config.cfg_parallel):
        group = results[cfg_rank * sp : (cfg_rank + 1) * sp]  # in sp-rank order
        for case, (prefix_lens, num_latent) in enumerate(CASES):
            x = make_block_inputs(_seed(cfg_rank, case), prefix_lens, num_latent)
            ref_joint, ref_latent, ref_joint_lse, ref_latent_lse = block_reference(x)
            where = f"cfg rank {cfg_rank}, prefixes {prefix_lens}, {num_latent} latent tokens"

            latent = torch.cat([r[f"{case}/latent"] for r in group], dim=1)[:, :num_latent]
            assert latent.dtype == torch.float32
            assert relative_error(latent, ref_latent) < tol, where
            for sp_rank, r in enumerate(group):
                assert relative_error(r[f"{case}/joint"], ref_joint) < tol, (where, sp_rank)

            if f"{case}/lse" in group[0]:
                joint_len = ref_joint.shape[1]
                latent_lse = torch.cat([r[f"{case}/lse"][:, joint_len:] for r in group], dim=1)
                assert relative_error(latent_lse[:, :num_latent], ref_latent_lse) < tol, where
                for r in group:
                    joint_lse = r[f"{case}/lse"][:, :joint_len]
                    assert relative_error(joint_lse, ref_joint_lse) < tol, where


@pytest.mark.parametrize("config", TOPOLOGIES.values(), ids=TOPOLOGIES.keys())
def test_sp_attention_output_equals_fp64_attention(config):
    _check_against_reference(config, TOL)


def _gather_all(mesh: ParallelMesh, sharding: LatentSharding, precision: str):
    """A toy SP attention: all-gather the latent q/k/v shards, attend to everything, keep this
    rank's shard of the output. Exact, and slow."""

    def attention(x: BlockQKV):
        q, k, v = (sharding.gather(t, mesh.sp_group) for t in (x.latent_q, x.latent_k, x.latent_v))
        whole = replace(x, latent_q=q, latent_k=k, latent_v=v)
        joint, latent = full_block_attention(whole, precision)
        return joint, sharding.shard(latent)

    return attention


def test_a_variant_registered_by_name_runs_without_other_changes():
    registry.register(
        "gather_all",
        SPAttention(build=_gather_all, supports=lambda c: c.sp_degree > 1, requires="sp > 1"),
    )
    try:
        _check_against_reference(ParallelConfig(ring=2, sp_attention="gather_all"), 1e-5)
    finally:
        registry.unregister("gather_all")
    assert "gather_all" not in registry.names()


def test_degree_one_uses_the_models_own_attention():
    mesh = ParallelMesh.build(ParallelConfig(), num_heads=HEADS, num_kv_heads=KV_HEADS)
    assert make_block_attention(mesh, mesh.latent_sharding(37)) is full_block_attention


def test_factory_rejects_a_sharding_from_another_topology():
    mesh = ParallelMesh.build(ParallelConfig(), num_heads=HEADS, num_kv_heads=KV_HEADS)
    with pytest.raises(ValueError, match="use mesh.latent_sharding"):
        make_block_attention(mesh, LatentSharding(37, 2, 0))


def _hybrids_with_degrees_their_groups_lack(rank: int, world: int) -> None:
    mesh = ParallelMesh.build(
        ParallelConfig(ring=2, ulysses=2), num_heads=HEADS, num_kv_heads=KV_HEADS
    )
    sharding = mesh.latent_sharding(13)
    # The products match the sharding's degree 4; the groups hold 2 ranks each, not 1 and 4.
    with pytest.raises(ValueError, match="Ulysses group has 2 ranks, expected 1"):
        UnifiedSequenceAttention(mesh.inner_group, mesh.ring_group, sharding, ulysses=1, ring=4)
    with pytest.raises(ValueError, match="KV gather group has 2 ranks, expected 4"):
        KVGatherRingAttention(mesh.inner_group, mesh.ring_group, sharding, inner=4, ring=1)
    with pytest.raises(ValueError, match="sharding degree 4 != ring 2 x ulysses 1"):
        UnifiedSequenceAttention(mesh.inner_group, mesh.ring_group, sharding, ulysses=1, ring=2)


def test_a_hybrid_runs_on_the_degrees_it_is_given_and_refuses_groups_that_disagree():
    run_ranks(4, _hybrids_with_degrees_their_groups_lack)
