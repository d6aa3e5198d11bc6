"""The velocity model of one rank: this rank's latent shard, its SP attention, and (with CFG
parallelism) its share of the CFG branches plus one all-gather of velocity shards per step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.distributed as dist
from torch import Tensor

from bagel.generation import BlockVelocity, ForwardGraphs, latent_position_ids
from bagel.kv import Branch, ContextKV
from bagel.model import Bagel
from bagel.step_cache import StepCache
from diffusion_service.parallel.collectives import all_gather_single
from diffusion_service.parallel.mesh import ParallelMesh
from diffusion_service.parallel.registry import make_block_attention
from diffusion_service.parallel.sharding import LatentSharding


class ShardedVelocity:
    """`(x_shard, t, branches) -> {branch: velocity shard}` on one rank of the mesh.

    Within an SP group the branches run batched in one forward. With CFG parallelism, branch `i`
    of a step runs on CFG group `i % cfg`; a step with one branch runs it on every group (no
    communication, identical results). Padding rows of the shard come back as zeros so they add
    nothing to the global renorm.
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
            attention=make_block_attention(mesh, sharding),
            batch_branches=True,
            graphs=graphs,
            # The SP attention is built for this token count: captures must not cross it.
            capture_key=(
                mesh.config.sp_attention_name,
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
        if cfg == 1 or len(branches) == 1:
            return {b: self._zero_padding(v) for b, v in self.block(x, t, branches).items()}
        slots = -(-len(branches) // cfg)
        mine = branches[self.mesh.cfg_rank :: cfg]
        local = x.new_zeros((slots, *x.shape))
        if mine:
            for i, v in enumerate(self.block(x, t, mine).values()):
                local[i] = self._zero_padding(v)
        else:  # more CFG groups than branches this step: this group only takes part
            self.block.step_cache.abstain()
        gathered = x.new_empty((cfg * slots, *x.shape))
        all_gather_single(gathered, local, group=self.mesh.cfg_group)
        # CFG rank r's slot i holds branch r + i * cfg.
        return {b: gathered[(i % cfg) * slots + i // cfg] for i, b in enumerate(branches)}


def shard_sum(mesh: ParallelMesh):
    """`reduce_sum` for the sampler's global renorm: a sum over the SP group's shards."""

    def reduce_sum(x: Tensor) -> Tensor:
        if mesh.sp_degree == 1:
            return x
        x = x.clone()
        dist.all_reduce(x, group=mesh.sp_group)
        return x

    return reduce_sum
