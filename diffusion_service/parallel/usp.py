"""Ulysses inside Ring (unified sequence parallelism), and the factory that picks an attention.

Latent layout over an SP group of `ring * ulysses` ranks: SP rank `s = ring_rank * ulysses +
ulysses_rank` holds the contiguous shard `s` of length S. The Ulysses group of ring rank `j` thus
holds shards `j*u .. j*u+u-1`, i.e. the contiguous *ring block* `j` of length `u*S`; after its
all-to-all, Ulysses rank `i` holds all of ring block `j` for head chunk `i`. The ring group of
Ulysses rank `i` (same head chunk, ring blocks 0..r-1) then runs plain Ring attention over those
blocks, and only the last ring block(s) hold padding.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from bagel.attention import BlockAttention, full_block_attention
from diffusion_service.parallel.mesh import ParallelMesh
from diffusion_service.parallel.ring import RingAttention, ring_attention_with_lse
from diffusion_service.parallel.sharding import LatentSharding
from diffusion_service.parallel.ulysses import (
    UlyssesAttention,
    head_chunk,
    heads_to_seq,
    seq_to_heads,
)


class UnifiedSequenceAttention:
    """`BlockAttention` for Ulysses (inner, contiguous ranks) inside Ring (outer, strided)."""

    def __init__(
        self,
        ulysses_group: dist.ProcessGroup,
        ring_group: dist.ProcessGroup,
        sharding: LatentSharding,
    ) -> None:
        ulysses, ring = dist.get_world_size(ulysses_group), dist.get_world_size(ring_group)
        ulysses_rank, ring_rank = dist.get_rank(ulysses_group), dist.get_rank(ring_group)
        if sharding.degree != ring * ulysses:
            raise ValueError(
                f"sharding degree {sharding.degree} != ring {ring} x ulysses {ulysses}"
            )
        if sharding.rank != ring_rank * ulysses + ulysses_rank:
            raise ValueError(
                f"shard {sharding.rank} held by ring rank {ring_rank}, ulysses rank "
                f"{ulysses_rank}; expected shard ring_rank * ulysses + ulysses_rank"
            )
        self.ulysses_group = ulysses_group
        self.ring_group = ring_group
        self.ulysses = ulysses
        self.ulysses_rank = ulysses_rank
        self.sharding = sharding
        # Real tokens in each ring block: the sum over the Ulysses shards it is made of.
        self.block_valid = [
            sum(sharding.valid_len(j * ulysses + i) for i in range(ulysses)) for j in range(ring)
        ]

    def __call__(
        self,
        joint_q: Tensor,
        joint_k: Tensor,
        joint_v: Tensor,
        joint_key_mask: Tensor | None,
        latent_q: Tensor,
        latent_k: Tensor,
        latent_v: Tensor,
    ) -> tuple[Tensor, Tensor]:
        jq, jk, jv = (
            head_chunk(t, self.ulysses, self.ulysses_rank) for t in (joint_q, joint_k, joint_v)
        )
        q, k, v = seq_to_heads(self.ulysses_group, [latent_q, latent_k, latent_v])
        out, _ = ring_attention_with_lse(
            self.ring_group, jq, jk, jv, joint_key_mask, q, k, v, self.block_valid
        )
        return heads_to_seq(self.ulysses_group, out.to(latent_q.dtype), joint_q.shape[1])


def make_block_attention(mesh: ParallelMesh, sharding: LatentSharding) -> BlockAttention:
    """The `BlockAttention` for this rank's SP group; `sharding` from `mesh.latent_sharding(n)`.

    Degree 1 gets the model's own `full_block_attention`; otherwise Ulysses, Ring or both.
    """
    if (sharding.degree, sharding.rank) != (mesh.sp_degree, mesh.sp_rank):
        raise ValueError(
            f"sharding (degree {sharding.degree}, rank {sharding.rank}) does not match the mesh "
            f"(sp degree {mesh.sp_degree}, sp rank {mesh.sp_rank}); use mesh.latent_sharding()"
        )
    if mesh.sp_degree == 1:
        return full_block_attention
    if mesh.ring == 1:
        return UlyssesAttention(mesh.ulysses_group, sharding)
    if mesh.ulysses == 1:
        return RingAttention(mesh.ring_group, sharding)
    return UnifiedSequenceAttention(mesh.ulysses_group, mesh.ring_group, sharding)
