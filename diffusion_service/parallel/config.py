"""The parallel layout of the diffusion ranks, in one validated dataclass: the degrees and the SP
attention variant. The CLI builds it, the rank launcher sizes the world from it, and the mesh is
built from it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelConfig:
    """`world = cfg_parallel x ring x ulysses`. `sp_attention` names an entry of the SP attention
    registry; None picks the default for the degrees."""

    ulysses: int = 1
    ring: int = 1
    cfg_parallel: int = 1
    sp_attention: str | None = None

    @property
    def world_size(self) -> int:
        return self.ulysses * self.ring * self.cfg_parallel

    @property
    def sp_degree(self) -> int:
        return self.ulysses * self.ring

    def validate(self, num_heads: int, num_kv_heads: int, world: int | None = None) -> None:
        """Raise ValueError listing the valid choices unless the model can run on this layout
        (and, when given, the layout fills exactly `world` ranks)."""
        from diffusion_service.parallel.mesh import validate_topology

        validate_topology(
            self.cfg_parallel,
            self.ring,
            self.ulysses,
            self.world_size if world is None else world,
            num_kv_heads,
            num_heads,
        )

    def describe(self) -> str:
        return f"ulysses {self.ulysses}, ring {self.ring}, cfg {self.cfg_parallel}"
