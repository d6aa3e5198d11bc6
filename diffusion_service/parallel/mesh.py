"""The diffusion service's rank topology, built from a validated `ParallelConfig`: CFG parallel
outermost, then Ring, then the inner group (Ulysses or KV gather, whichever splits it).

`rank = cfg_rank * (ring * inner) + ring_rank * inner + inner_rank`: inner groups are contiguous
ranks because their all-to-all or all-gather is the heaviest traffic and neighbouring ranks share
the fastest links; Ring groups are strided; a CFG branch owns one contiguous block of
`ring * inner` ranks (its sequence-parallel group).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from diffusion_service.parallel.config import ParallelConfig
from diffusion_service.parallel.sharding import LatentSharding


def mesh_rank_groups(config: ParallelConfig) -> dict[str, list[list[int]]]:
    """Global ranks of every group of each kind, in the order the groups are created.

    Kinds: `inner` (the Ulysses or the KV-gather ranks), `ring` (ordered by ring rank), `sp` (one
    per CFG branch, ordered by sp rank = `ring_rank * inner + inner_rank`), `cfg` (the ranks with
    the same sp rank).
    """
    cfg_parallel, ring, inner = config.cfg_parallel, config.ring, config.inner_degree
    sp = config.sp_degree

    def rank(c: int, r: int, i: int) -> int:
        return c * sp + r * inner + i

    return {
        "inner": [
            [rank(c, r, i) for i in range(inner)] for c in range(cfg_parallel) for r in range(ring)
        ],
        "ring": [
            [rank(c, r, i) for r in range(ring)] for c in range(cfg_parallel) for i in range(inner)
        ],
        "sp": [[c * sp + s for s in range(sp)] for c in range(cfg_parallel)],
        "cfg": [[c * sp + s for c in range(cfg_parallel)] for s in range(sp)],
    }


@dataclass(frozen=True)
class ParallelMesh:
    """This rank's place in the topology and the process groups it talks over.

    Groups are None only in a single process without `torch.distributed`, where no collective
    is ever issued (degree 1 everywhere).
    """

    config: ParallelConfig
    rank: int
    world: int
    inner_group: dist.ProcessGroup | None
    ring_group: dist.ProcessGroup | None
    sp_group: dist.ProcessGroup | None
    cfg_group: dist.ProcessGroup | None
    inner_ranks: tuple[int, ...]
    ring_ranks: tuple[int, ...]
    sp_ranks: tuple[int, ...]
    cfg_ranks: tuple[int, ...]

    @classmethod
    def build(
        cls,
        config: ParallelConfig,
        *,
        num_heads: int,
        num_kv_heads: int,
        timeout: timedelta | None = None,
    ) -> ParallelMesh:
        """Validate `config` against the world and the model, and create every process group;
        call on every rank alike.

        `timeout` bounds every collective on the new groups (pass the one given to
        `init_process_group`); None inherits the world group's timeout where torch exposes it.
        """
        initialized = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if initialized else 1
        rank = dist.get_rank() if initialized else 0
        config.validate(num_heads, num_kv_heads, world)
        layout = mesh_rank_groups(config)
        mine = {kind: next(g for g in groups if rank in g) for kind, groups in layout.items()}
        handles: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
        if initialized:
            if timeout is None:
                timeout = _world_timeout()
            # new_group is collective over the whole world: every rank creates every group in
            # the same order. Groups with the same members (ring == sp when the inner degree is
            # 1) share one handle and the whole world reuses WORLD, so NCCL builds no redundant
            # communicators.
            for groups in layout.values():
                for members in map(tuple, groups):
                    if members in handles:
                        continue
                    if len(members) == world:
                        handles[members] = dist.group.WORLD
                    else:
                        handles[members] = dist.new_group(list(members), timeout=timeout)
        else:
            handles = {tuple(members): None for members in mine.values()}
        return cls(
            config=config,
            rank=rank,
            world=world,
            inner_group=handles[tuple(mine["inner"])],
            ring_group=handles[tuple(mine["ring"])],
            sp_group=handles[tuple(mine["sp"])],
            cfg_group=handles[tuple(mine["cfg"])],
            inner_ranks=tuple(mine["inner"]),
            ring_ranks=tuple(mine["ring"]),
            sp_ranks=tuple(mine["sp"]),
            cfg_ranks=tuple(mine["cfg"]),
        )

    @property
    def cfg_parallel(self) -> int:
        return self.config.cfg_parallel

    @property
    def ring(self) -> int:
        return self.config.ring

    @property
    def inner(self) -> int:
        """The inner degree: Ulysses' or KV gather's (the same contiguous-rank arithmetic)."""
        return self.config.inner_degree

    @property
    def sp_degree(self) -> int:
        return self.config.sp_degree

    @property
    def cfg_rank(self) -> int:
        return self.rank // self.sp_degree

    @property
    def sp_rank(self) -> int:
        """Rank within the sequence-parallel group: `ring_rank * inner + inner_rank`."""
        return self.rank % self.sp_degree

    @property
    def ring_rank(self) -> int:
        return self.sp_rank // self.inner

    @property
    def inner_rank(self) -> int:
        return self.rank % self.inner

    def latent_sharding(self, num_tokens: int) -> LatentSharding:
        """This rank's shard of a latent sequence of `num_tokens` over its SP group."""
        return LatentSharding(num_tokens, self.sp_degree, self.sp_rank)


def _world_timeout() -> timedelta | None:
    # torch gives a new group its backend's default timeout (30 min for gloo), not the world's;
    # the world's is only reachable through the backend options, so read it defensively.
    for device in ("cpu", "cuda"):
        try:
            return dist.group.WORLD._get_backend(torch.device(device)).options._timeout
        except (AttributeError, RuntimeError):
            continue
    return None
