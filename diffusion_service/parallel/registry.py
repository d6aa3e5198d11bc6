"""SP attention variants by name: a new variant is one file plus one `register` call.

Each entry builds this rank's `BlockAttention` from the mesh, the latent sharding and the
attention precision, handing the variant its degrees from the mesh's config, and says which degrees it runs on; `ParallelConfig.validate` checks the configured name against it, and
`make_block_attention` looks it up. The config and the mesh depend on this module, so it sees
them through the two protocols below: what a variant may read of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch.distributed as dist

from bagel.network.attention import (
    AttentionPrecision,
    BlockAttention,
    block_attention,
    check_attention_precision,
)
from diffusion_service.parallel.kv_gather import KVGatherAttention, KVGatherRingAttention
from diffusion_service.parallel.ring import RingAttention
from diffusion_service.parallel.sharding import LatentSharding
from diffusion_service.parallel.ulysses import UlyssesAttention
from diffusion_service.parallel.usp import UnifiedSequenceAttention


class Degrees(Protocol):
    """A `ParallelConfig`, as a variant's `supports` sees it."""

    @property
    def ulysses(self) -> int: ...
    @property
    def ring(self) -> int: ...
    @property
    def kv_gather(self) -> int: ...
    @property
    def sp_degree(self) -> int: ...
    @property
    def sp_attention_name(self) -> str: ...


class SPMesh(Protocol):
    """A `ParallelMesh`, as a variant's `build` sees it: the groups of this rank's SP group and
    their degrees."""

    @property
    def config(self) -> Degrees: ...
    @property
    def inner_group(self) -> dist.ProcessGroup | None:
        """The inner (contiguous) group: the Ulysses or the KV-gather ranks."""
        ...

    @property
    def inner(self) -> int:
        """The inner group's degree: Ulysses' or KV gather's."""
        ...

    @property
    def ring_group(self) -> dist.ProcessGroup | None: ...
    @property
    def ring(self) -> int: ...
    @property
    def sp_group(self) -> dist.ProcessGroup | None: ...
    @property
    def sp_degree(self) -> int: ...
    @property
    def sp_rank(self) -> int: ...


@dataclass(frozen=True)
class SPAttention:
    """One SP attention variant.

    `build(mesh, sharding, precision)` is called on every rank of the mesh alike, `precision`
    being how every block of keys is attended (`bagel.network.attention.AttentionPrecision`);
    `supports(config)` says
    whether the variant runs on the config's degrees, and `requires` says the same in words for
    error messages.
    """

    build: Callable[[SPMesh, LatentSharding, AttentionPrecision], BlockAttention]
    supports: Callable[[Degrees], bool]
    requires: str


_VARIANTS: dict[str, SPAttention] = {}


def register(name: str, variant: SPAttention) -> None:
    if name in _VARIANTS:
        raise ValueError(f"an SP attention named {name!r} is already registered")
    _VARIANTS[name] = variant


def unregister(name: str) -> None:
    del _VARIANTS[name]


def names() -> list[str]:
    """The registered names, in registration order."""
    return list(_VARIANTS)


def lookup(name: str) -> SPAttention:
    try:
        return _VARIANTS[name]
    except KeyError:
        raise ValueError(
            f"unknown sp_attention {name!r}; valid names: {', '.join(_VARIANTS)}"
        ) from None


def default_sp_attention(config: Degrees) -> str:
    """The variant the degrees imply: none at SP degree 1; KV gather (inside a Ring, if any) when
    its degree is set; else Ulysses, Ring, or both."""
    if config.sp_degree == 1:
        return "none"
    if config.kv_gather > 1:
        return "kv_gather" if config.ring == 1 else "kv_gather_ring"
    if config.ring == 1:
        return "ulysses"
    if config.ulysses == 1:
        return "ring"
    return "usp"


def make_block_attention(
    mesh: SPMesh, sharding: LatentSharding, precision: AttentionPrecision = "bf16"
) -> BlockAttention:
    """This rank's `BlockAttention`, of the variant the mesh's config names, attending in
    `precision`; `sharding` from `mesh.latent_sharding(n)`."""
    check_attention_precision(precision)
    if (sharding.degree, sharding.rank) != (mesh.sp_degree, mesh.sp_rank):
        raise ValueError(
            f"sharding (degree {sharding.degree}, rank {sharding.rank}) does not match the mesh "
            f"(sp degree {mesh.sp_degree}, sp rank {mesh.sp_rank}); use mesh.latent_sharding()"
        )
    return lookup(mesh.config.sp_attention_name).build(mesh, sharding, precision)


# The model's own attention: every latent token is on this rank.
register(
    "none",
    SPAttention(
        build=lambda mesh, sharding, precision: block_attention(precision),
        supports=lambda c: c.sp_degree == 1,
        requires="ulysses == ring == 1",
    ),
)
register(
    "ulysses",
    SPAttention(
        build=lambda mesh, sharding, precision: UlyssesAttention(
            mesh.inner_group, sharding, precision
        ),
        supports=lambda c: c.ring == 1 < c.ulysses and c.kv_gather == 1,
        requires="ring == 1 < ulysses, no kv_gather",
    ),
)
register(
    "ring",
    SPAttention(
        build=lambda mesh, sharding, precision: RingAttention(mesh.ring_group, sharding, precision),
        supports=lambda c: c.ulysses == c.kv_gather == 1 < c.ring,
        requires="ulysses == kv_gather == 1 < ring",
    ),
)
register(
    "usp",
    SPAttention(
        build=lambda mesh, sharding, precision: UnifiedSequenceAttention(
            mesh.inner_group,
            mesh.ring_group,
            sharding,
            ulysses=mesh.inner,
            ring=mesh.ring,
            precision=precision,
        ),
        supports=lambda c: c.ring > 1 and c.ulysses > 1,
        requires="ring > 1 and ulysses > 1",
    ),
)
register(
    "kv_gather",
    SPAttention(
        build=lambda mesh, sharding, precision: KVGatherAttention(
            mesh.inner_group, sharding, precision
        ),
        supports=lambda c: c.ring == 1 < c.kv_gather and c.ulysses == 1,
        requires="ring == ulysses == 1 < kv_gather",
    ),
)
register(
    "kv_gather_ring",
    SPAttention(
        build=lambda mesh, sharding, precision: KVGatherRingAttention(
            mesh.inner_group,
            mesh.ring_group,
            sharding,
            inner=mesh.inner,
            ring=mesh.ring,
            precision=precision,
        ),
        supports=lambda c: c.ring > 1 and c.kv_gather > 1 and c.ulysses == 1,
        requires="ring > 1 and kv_gather > 1, no ulysses",
    ),
)
