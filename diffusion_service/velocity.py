"""The velocity model of one rank: this rank's latent shard, its SP attention, and (with CFG
parallelism) its share of the CFG branches plus one all-gather of velocity shards per step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.distributed as dist
from torch import Tensor

from bagel.diffusion.generation import BlockVelocity, ForwardGraphs
from bagel.diffusion.step_cache import StepCache
from bagel.network.attention import AttentionPrecision
from bagel.network.kv import Branch, ContextKV
from bagel.network.latents import latent_position_ids
from bagel.network.model import Bagel
from diffusion_service.parallel.collectives import all_gather_single
from diffusion_service.parallel.mesh import ParallelMesh
from diffusion_service.parallel.registry import make_block_attention
from diffusion_service.parallel.sharding import LatentSharding


class ShardedVelocity:
    """`(x_shard, t, branches) -> {branch: velocity shard}` on one rank of the mesh.

    Within an SP group the branches run batched in one forward. With CFG parallelism every
    branch has one owner CFG group for the whole job (`owner_group`), whatever the other
    branches of a step: the step cache's state for a branch lives where the branch runs, so a
    branch must not move between groups when the CFG window closes mid-run. Each step, every
    group runs the branches it owns (a group that owns none of them only joins the step cache's
    decision) and one all-gather shares the velocity shards. Padding rows of the shard come back
    as zeros so they add nothing to the global renorm.
    """

    def __init__(
        self,
        model: Bagel,
        contexts: Mapping[Branch, ContextKV],
        mesh: ParallelMesh,
        sharding: LatentSharding,
        grid: tuple[int, int],
        marker_ids: tuple[int, int],
        graphs: ForwardGraphs | None = None,
        step_cache: StepCache | None = None,
        attention_precision: AttentionPrecision = "bf16",
    ) -> None:
        rows, cols = grid
        pos_ids = latent_position_ids(rows, cols, model.config.max_latent_size)
        self.mesh = mesh
        self.sharding = sharding
        self.block = BlockVelocity(
            model,
            contexts,
            sharding.shard(pos_ids, dim=0),
            marker_ids,
            attention=make_block_attention(mesh, sharding, attention_precision),
            batch_branches=True,
            graphs=graphs,
            # The SP attention is built for this token count and precision: captures must not
            # cross them.
            capture_key=(
                mesh.config.sp_attention_name,
                attention_precision,
                sharding.num_tokens,
                sharding.degree,
                sharding.rank,
            ),
            step_cache=step_cache,
        )

    def _zero_padding(self, v: Tensor) -> Tensor:
        valid = self.sharding.num_valid
        if valid < v.shape[0]:
            v = v.clone()
            v[valid:] = 0
        return v

    def __call__(self, x: Tensor, t: Tensor, branches: Sequence[Branch]) -> dict[Branch, Tensor]:
        branches = tuple(branches)
        cfg = self.mesh.cfg_parallel
        if cfg == 1:
            return {b: self._zero_padding(v) for b, v in self.block(x, t, branches).items()}
        owned = [[b for b in branches if owner_group(b, cfg) == g] for g in range(cfg)]
        slots = max(len(group) for group in owned)
        mine = owned[self.mesh.cfg_rank]
        local = x.new_zeros((slots, *x.shape))
        if mine:
            for i, v in enumerate(self.block(x, t, mine).values()):
                local[i] = self._zero_padding(v)
        else:  # this group owns none of the step's branches: it only takes part
            self.block.step_cache.abstain()
        gathered = x.new_empty((cfg * slots, *x.shape))
        all_gather_single(gathered, local, group=self.mesh.cfg_group)
        # CFG group g's slot i holds the i-th branch it owns.
        slot = {b: g * slots + i for g in range(cfg) for i, b in enumerate(owned[g])}
        return {b: gathered[slot[b]] for b in branches}


def owner_group(branch: Branch, cfg_parallel: int) -> int:
    """The CFG group that runs `branch` on every step of a job: by the branch's identity, so
    text-to-image's two branches and editing's three spread over the groups as evenly as the
    degree allows, and the conditional branch, which every step runs, stays on group 0."""
    return (int(branch) - 1) % cfg_parallel


def shard_sum(mesh: ParallelMesh):
    """`reduce_sum` for the sampler's global renorm: a sum over the SP group's shards."""

    def reduce_sum(x: Tensor) -> Tensor:
        if mesh.sp_degree == 1:
            return x
        x = x.clone()
        dist.all_reduce(x, group=mesh.sp_group)
        return x

    return reduce_sum
