"""KV all-gather sequence parallelism: queries stay sharded, only K and V travel.

Each rank keeps its latent query shard and all-gathers the latent K/V shards of its group, then
runs one attention call of `[joint; local latents]` against `[joint; all latents]`. With GQA the
K/V shards are `Hkv` heads against `H` query heads (4 against 28 for BAGEL), so the gather moves
far fewer bytes than Ulysses' all-to-all of Q, K, V and the output, and it needs no head split.
Inside a Ring, the gathered keys of the group are the group's ring block.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from bagel.network.attention import AttentionPrecision, BlockQKV, attend_block
from diffusion_service.parallel.collectives import all_gather_single
from diffusion_service.parallel.ring import ring_attention_with_lse
from diffusion_service.parallel.sharding import LatentSharding, OneGroupAttention, check_group


def gather_kv(group: dist.ProcessGroup, degree: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """All-gather `[B, S, Hkv, D]` shards of K and V over the `degree` ranks of `group` (group
    rank `i` holds shard `i`) in one collective; returns `[B, degree * S, Hkv, D]` each, pad
    included."""
    local = torch.stack([k, v])  # [2, B, S, Hkv, D]: one collective for both
    gathered = local.new_empty((degree * 2, *local.shape[1:]))
    all_gather_single(gathered, local, group=group)
    # [degree * 2, B, S, ...] -> [2, B, degree * S, ...]
    joined = gathered.unflatten(0, (degree, 2)).permute(1, 2, 0, 3, 4, 5).flatten(2, 3)
    return joined[0], joined[1]


class KVGatherAttention(OneGroupAttention):
    """`BlockAttention` over a KV-gather group; `sharding` is this rank's shard of the latents,
    its degree the KV-gather degree and its rank this rank's place in the group."""

    GROUP = "KV gather"

    def __call__(self, x: BlockQKV) -> tuple[Tensor, Tensor]:
        keys, values = gather_kv(self.group, self.sharding.degree, x.latent_k, x.latent_v)
        # Pad keys all sit at the end of the gathered sequence: cut them off rather than mask.
        n = self.sharding.num_tokens
        k = torch.cat([x.joint_k, keys[:, :n]], dim=1)
        v = torch.cat([x.joint_v, values[:, :n]], dim=1)
        mask = None
        if x.joint_key_mask is not None:
            latent = x.joint_key_mask.new_ones((k.shape[0], n))
            mask = torch.cat([x.joint_key_mask, latent], dim=1)
        return attend_block(x.joint_q, x.latent_q, k, v, mask, self.precision)


class KVGatherRingAttention:
    """`BlockAttention` for KV gather (inner, contiguous ranks) inside Ring (outer, strided): the
    inner group gathers its K/V shards into its ring block, which then travels the ring while
    every rank's queries stay its own shard.

    `inner` and `ring` are the KV-gather and Ring degrees; SP rank `ring_rank * inner +
    inner_rank` holds shard `sharding.rank` of `sharding.degree = ring * inner`.
    """

    def __init__(
        self,
        inner_group: dist.ProcessGroup,
        ring_group: dist.ProcessGroup,
        sharding: LatentSharding,
        *,
        inner: int,
        ring: int,
        precision: AttentionPrecision = "bf16",
    ) -> None:
        if sharding.degree != ring * inner:
            raise ValueError(f"sharding degree {sharding.degree} != ring {ring} x inner {inner}")
        ring_rank, inner_rank = divmod(sharding.rank, inner)
        check_group(inner_group, inner, inner_rank, "KV gather")
        check_group(ring_group, ring, ring_rank, "ring")
        self.inner_group = inner_group
        self.ring_group = ring_group
        self.inner = inner
        self.ring_rank = ring_rank
        self.precision = precision
        # Real tokens in each ring block: the sum over the inner shards it is made of.
        self.block_valid = [
            sum(sharding.valid_len(j * inner + i) for i in range(inner)) for j in range(ring)
        ]

    def __call__(self, x: BlockQKV) -> tuple[Tensor, Tensor]:
        keys, values = gather_kv(self.inner_group, self.inner, x.latent_k, x.latent_v)
        block = BlockQKV(
            x.joint_q, x.joint_k, x.joint_v, x.joint_key_mask, x.latent_q, keys, values
        )
        out, _ = ring_attention_with_lse(
            self.ring_group, self.ring_rank, block, self.block_valid, self.precision
        )
        out = out.to(x.latent_q.dtype)
        joint_len = x.joint_q.shape[1]
        return out[:, :joint_len], out[:, joint_len:]
