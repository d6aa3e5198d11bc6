"""Ulysses inside Ring (unified sequence parallelism).

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

from bagel.network.attention import AttentionPrecision, BlockQKV
from diffusion_service.parallel.ring import ring_attention_with_lse
from diffusion_service.parallel.sharding import LatentSharding, check_group
from diffusion_service.parallel.ulysses import head_chunk, heads_to_seq, seq_to_heads


class UnifiedSequenceAttention:
    """`BlockAttention` for Ulysses (inner, contiguous ranks) inside Ring (outer, strided), of
    degrees `ulysses` and `ring`; SP rank `ring_rank * ulysses + ulysses_rank` holds shard
    `sharding.rank` of `sharding.degree = ring * ulysses`."""

    def __init__(
        self,
        ulysses_group: dist.ProcessGroup,
        ring_group: dist.ProcessGroup,
        sharding: LatentSharding,
        *,
        ulysses: int,
        ring: int,
        precision: AttentionPrecision = "bf16",
    ) -> None:
        if sharding.degree != ring * ulysses:
            raise ValueError(
                f"sharding degree {sharding.degree} != ring {ring} x ulysses {ulysses}"
            )
        ring_rank, ulysses_rank = divmod(sharding.rank, ulysses)
        check_group(ulysses_group, ulysses, ulysses_rank, "Ulysses")
        check_group(ring_group, ring, ring_rank, "ring")
        self.ulysses_group = ulysses_group
        self.ring_group = ring_group
        self.ulysses = ulysses
        self.ulysses_rank = ulysses_rank
        self.ring_rank = ring_rank
        self.sharding = sharding
        self.precision = precision
        # Real tokens in each ring block: the sum over the Ulysses shards it is made of.
        self.block_valid = [
            sum(sharding.valid_len(j * ulysses + i) for i in range(ulysses)) for j in range(ring)
        ]

    def __call__(self, x: BlockQKV) -> tuple[Tensor, Tensor]:
        jq, jk, jv = (
            head_chunk(t, self.ulysses, self.ulysses_rank)
            for t in (x.joint_q, x.joint_k, x.joint_v)
        )
        q, k, v = seq_to_heads(
            self.ulysses_group, self.ulysses, [x.latent_q, x.latent_k, x.latent_v]
        )
        heads = BlockQKV(jq, jk, jv, x.joint_key_mask, q, k, v)
        out, _ = ring_attention_with_lse(
            self.ring_group, self.ring_rank, heads, self.block_valid, self.precision
        )
        out = out.to(x.latent_q.dtype)
        return heads_to_seq(self.ulysses_group, self.ulysses, out, x.joint_q.shape[1])
