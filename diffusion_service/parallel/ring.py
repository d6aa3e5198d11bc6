"""Ring sequence parallelism: queries stay put while latent K/V blocks travel around the ring.

Each rank attends its queries (`[joint; local latents]`, all heads) to one K/V block per step,
posting the next block's transfer before computing the current one, and merges the blocks'
partial results by log-sum-exp in fp32. The replicated joint keys are attended once, in step 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import torch
import torch.distributed as dist
from torch import Tensor

from bagel.network.attention import AttentionPrecision, BlockQKV
from diffusion_service.parallel.lse import attention_with_lse, merge_attention
from diffusion_service.parallel.sharding import OneGroupAttention


def ring_attention_with_lse(
    group: dist.ProcessGroup,
    ring_rank: int,
    x: BlockQKV,
    block_valid: Sequence[int],
    precision: AttentionPrecision = "bf16",
) -> tuple[Tensor, Tensor]:
    """Attention of `[joint_q; latent_q]` to the joint keys and every ring rank's latent block,
    on ring rank `ring_rank` of `group`.

    `x.latent_*` is this rank's block (`[B, S, *, D]`, the same S on every rank); `block_valid[j]`
    counts the real tokens at the front of ring rank `j`'s block (the rest is pad, never read),
    one entry per ring rank, so its length is the ring degree. Each block is attended in
    `precision`.
    Returns fp32 `out [B, Lj + S, H, D]` and `lse [B, Lj + S, H]`.
    """
    size, me = len(block_valid), ring_rank
    send_to, recv_from = (me + 1) % size, (me - 1) % size

    q = torch.cat([x.joint_q, x.latent_q], dim=1)
    # K and V travel as one tensor so each step is one send and one receive.
    block = torch.stack([x.latent_k, x.latent_v])
    incoming = torch.empty_like(block)
    out = lse = None
    for step in range(size):
        transfers = []
        if step + 1 < size:
            # Post the next block's transfer first so it overlaps this block's computation.
            transfers = dist.batch_isend_irecv(
                [
                    dist.P2POp(dist.isend, block, group=group, group_peer=send_to),
                    dist.P2POp(dist.irecv, incoming, group=group, group_peer=recv_from),
                ]
            )
        owner = (me - step) % size  # the ring rank whose latent block we hold at this step
        valid = block_valid[owner]
        keys, values = block[0][:, :valid], block[1][:, :valid]
        if step == 0:
            out, lse = _attend_joint_and_own(q, x, keys, values, precision)
        elif valid > 0:
            block_out, block_lse = attention_with_lse(q, keys, values, None, precision)
            out, lse = merge_attention(out, lse, block_out, block_lse)
        for work in transfers:
            work.wait()  # bounded by the group's timeout, so a dead peer cannot hang us
        block, incoming = incoming, block
    return out, lse


def _attend_joint_and_own(
    q: Tensor, x: BlockQKV, own_k: Tensor, own_v: Tensor, precision: AttentionPrecision
) -> tuple[Tensor, Tensor]:
    # One block: the joint keys in front of this rank's latent keys (one kernel, not two plus a
    # merge: a masked block costs less than a separate joint block and its merge).
    mask = None
    if x.joint_key_mask is not None:
        own = x.joint_key_mask.new_ones((own_k.shape[0], own_k.shape[1]))
        mask = torch.cat([x.joint_key_mask, own], dim=1)
    k, v = torch.cat([x.joint_k, own_k], dim=1), torch.cat([x.joint_v, own_v], dim=1)
    return attention_with_lse(q, k, v, mask, precision)


class RingAttention(OneGroupAttention):
    """`BlockAttention` over a ring group; `sharding` is this rank's shard of the latents, its
    degree the ring degree and its rank this rank's ring rank."""

    GROUP = "ring"

    @cached_property
    def block_valid(self) -> list[int]:
        """The real (unpadded) latent rows of each rank's block, in ring order."""
        return [self.sharding.valid_len(j) for j in range(self.sharding.degree)]

    def attend_with_lse(self, x: BlockQKV) -> tuple[Tensor, Tensor]:
        """fp32 output and LSE for the rows `[joint_q; latent_q]`."""
        return ring_attention_with_lse(
            self.group, self.sharding.rank, x, self.block_valid, self.precision
        )

    def __call__(self, x: BlockQKV) -> tuple[Tensor, Tensor]:
        out, _ = self.attend_with_lse(x)
        out = out.to(x.latent_q.dtype)
        joint_len = x.joint_q.shape[1]
        return out[:, :joint_len], out[:, joint_len:]
