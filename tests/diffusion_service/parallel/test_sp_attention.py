"""Ulysses, Ring and hybrid attention on real gloo processes equal a plain fp64 attention.

Every rank builds the same full inputs from a seed, keeps its latent shard (pad filled with
large garbage, which must never be read as a key), runs the factory's attention, and returns
its outputs; the parent reassembles the shards and compares with the fp64 reference.
"""

from __future__ import annotations

import pytest
import torch

from bagel.attention import full_block_attention
from diffusion_service.parallel.mesh import ParallelMesh
from diffusion_service.parallel.ring import RingAttention
from diffusion_service.parallel.usp import make_block_attention
from tests.diffusion_service.parallel.reference import (
    HEADS,
    KV_HEADS,
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

# (cfg_parallel, ring, ulysses)
TOPOLOGIES = {
    "ulysses2": (1, 1, 2),
    "ulysses4": (1, 1, 4),
    "ring2": (1, 2, 1),
    "ring3": (1, 3, 1),
    "ring4": (1, 4, 1),
    "ring2_ulysses2": (1, 2, 2),
    "cfg2_ulysses2": (2, 1, 2),
}


def _seed(cfg_rank: int, case: int) -> int:
    # Each CFG group gets its own inputs, so groups that talked to each other would show.
    return 1000 * cfg_rank + case


def _sp_rank(rank: int, world: int, cfg: int, ring: int, ulysses: int) -> dict:
    mesh = ParallelMesh.build(cfg, ring, ulysses, num_heads=HEADS, num_kv_heads=KV_HEADS)
    results = {}
    for case, (prefix_lens, num_latent) in enumerate(CASES):
        seed = _seed(mesh.cfg_rank, case)
        x = make_block_inputs(seed, prefix_lens, num_latent)
        sharding = mesh.latent_sharding(num_latent)
        latent = [
            sharding.shard(with_garbage_pad(t, sharding.padded_len, seed + i))
            for i, t in enumerate((x.latent_q, x.latent_k, x.latent_v))
        ]
        joint = (x.joint_q, x.joint_k, x.joint_v, x.joint_key_mask)
        attn = make_block_attention(mesh, sharding)
        results[f"{case}/joint"], results[f"{case}/latent"] = attn(*joint, *latent)
        if isinstance(attn, RingAttention):
            _, results[f"{case}/lse"] = attn.attend_with_lse(*joint, *latent)
    return results


@pytest.mark.parametrize("topology", TOPOLOGIES.values(), ids=TOPOLOGIES.keys())
def test_sp_attention_output_equals_fp64_attention(topology):
    cfg, ring, ulysses = topology
    sp = ring * ulysses
    results = run_ranks(cfg * sp, _sp_rank, cfg, ring, ulysses)
    for cfg_rank in range(cfg):
        group = results[cfg_rank * sp : (cfg_rank + 1) * sp]  # in sp-rank order
        for case, (prefix_lens, num_latent) in enumerate(CASES):
            x = make_block_inputs(_seed(cfg_rank, case), prefix_lens, num_latent)
            ref_joint, ref_latent, ref_joint_lse, ref_latent_lse = x.reference()
            where = f"cfg rank {cfg_rank}, prefixes {prefix_lens}, {num_latent} latent tokens"

            latent = torch.cat([r[f"{case}/latent"] for r in group], dim=1)[:, :num_latent]
            assert latent.dtype == torch.float32
            assert relative_error(latent, ref_latent) < TOL, where
            for sp_rank, r in enumerate(group):
                assert relative_error(r[f"{case}/joint"], ref_joint) < TOL, (where, sp_rank)

            if f"{case}/lse" in group[0]:
                joint_len = ref_joint.shape[1]
                latent_lse = torch.cat([r[f"{case}/lse"][:, joint_len:] for r in group], dim=1)
                assert relative_error(latent_lse[:, :num_latent], ref_latent_lse) < TOL, where
                for r in group:
                    joint_lse = r[f"{case}/lse"][:, :joint_len]
                    assert relative_error(joint_lse, ref_joint_lse) < TOL, where


def test_degree_one_uses_the_models_own_attention():
    mesh = ParallelMesh.build(1, 1, 1, num_heads=HEADS, num_kv_heads=KV_HEADS)
    assert make_block_attention(mesh, mesh.latent_sharding(37)) is full_block_attention


def test_factory_rejects_a_sharding_from_another_topology():
    mesh = ParallelMesh.build(1, 1, 1, num_heads=HEADS, num_kv_heads=KV_HEADS)
    from diffusion_service.parallel.sharding import LatentSharding

    with pytest.raises(ValueError, match="use mesh.latent_sharding"):
        make_block_attention(mesh, LatentSharding(37, 2, 0))
