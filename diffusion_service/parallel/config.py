"""The parallel layout of the diffusion ranks, in one validated dataclass: the degrees and the SP
attention variant. Its fields are the diffusion service's flags (`serving.flags`); the rank
launcher sizes the world from it, and the mesh is built from it."""

from __future__ import annotations

from dataclasses import dataclass

from diffusion_service.parallel import registry
from serving.flags import option

# BAGEL has at most three CFG branches (cond, uncond-text, uncond-image).
MAX_CFG_PARALLEL = 3


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class ParallelConfig:
    """`world = cfg_parallel x ring x inner`, the inner (contiguous) ranks splitting the latents
    by Ulysses (`ulysses`) or by KV all-gather (`kv_gather`), at most one of them above 1.
    `sp_attention` names an entry of the SP attention registry; None picks the default for the
    degrees."""

    ulysses: int = option("Ulysses degree (divides the KV heads)", default=1)
    ring: int = option("Ring degree", default=1)
    cfg_parallel: int = option("CFG-parallel degree", default=1)
    sp_attention: str | None = option(
        "SP attention variant by name (default: the one the degrees imply)", default=None
    )
    kv_gather: int = option(
        "KV all-gather degree: the inner group splits the latents and gathers only K and V "
        "(instead of --ulysses; composes with --ring and --cfg-parallel)",
        default=1,
    )

    @property
    def inner_degree(self) -> int:
        """Ranks of the inner group: the Ulysses or the KV-gather degree."""
        return self.ulysses * self.kv_gather

    @property
    def world_size(self) -> int:
        return self.inner_degree * self.ring * self.cfg_parallel

    @property
    def sp_degree(self) -> int:
        return self.inner_degree * self.ring

    @property
    def sp_attention_name(self) -> str:
        """`sp_attention`, or the registry's default for the degrees when it is None."""
        if self.sp_attention is not None:
            return self.sp_attention
        return registry.default_sp_attention(self)

    @classmethod
    def valid_layouts(cls, world: int, num_kv_heads: int) -> list[ParallelConfig]:
        """Every layout (default SP attention) that fits `world` ranks and `num_kv_heads` KV
        heads, CFG degree first, then Ulysses, both ascending."""
        return [
            cls(ulysses=ulysses, ring=world // (cfg * ulysses), cfg_parallel=cfg)
            for cfg in _divisors(world)
            if cfg <= MAX_CFG_PARALLEL
            for ulysses in _divisors(world // cfg)
            if num_kv_heads % ulysses == 0
        ]

    def validate(self, num_heads: int, num_kv_heads: int, world: int | None = None) -> None:
        """Raise ValueError listing the valid choices unless the model can run on this layout
        (and, when given, the layout fills exactly `world` ranks).

        Ulysses splits KV heads over its ranks without replicating them, so its degree must
        divide `num_kv_heads`; `sp_attention` must name a registered variant that runs on these
        degrees. Every problem is reported at once.
        """
        world = self.world_size if world is None else world
        problems = [
            f"{name} must be a positive integer, got {value!r}"
            for name, value in (
                ("cfg_parallel", self.cfg_parallel),
                ("ring", self.ring),
                ("ulysses", self.ulysses),
                ("kv_gather", self.kv_gather),
            )
            if not isinstance(value, int) or value < 1
        ]
        if problems:
            raise ValueError("; ".join(problems))
        if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
            raise ValueError(
                f"the model's {num_heads} query heads are not a multiple of its "
                f"{num_kv_heads} KV heads"
            )
        if self.ulysses > 1 and self.kv_gather > 1:
            problems.append(
                f"ulysses={self.ulysses} and kv_gather={self.kv_gather} both split the inner "
                "group; set one of them"
            )
        if self.cfg_parallel > MAX_CFG_PARALLEL:
            problems.append(
                f"cfg_parallel={self.cfg_parallel} exceeds the {MAX_CFG_PARALLEL} CFG branches; "
                "valid cfg_parallel degrees: " + ", ".join(map(str, range(1, MAX_CFG_PARALLEL + 1)))
            )
        if num_kv_heads % self.ulysses != 0:
            problems.append(
                f"ulysses={self.ulysses} does not divide the {num_kv_heads} KV heads; "
                f"valid ulysses degrees: {', '.join(map(str, _divisors(num_kv_heads)))}"
            )
        if self.world_size != world:
            inner = "kv_gather" if self.kv_gather > 1 else "ulysses"
            problems.append(
                f"world size {world} does not equal cfg_parallel x ring x {inner} = "
                f"{self.cfg_parallel} x {self.ring} x {self.inner_degree} = {self.world_size}"
            )
        message = "; ".join(problems)
        if problems:
            choices = ", ".join(
                f"(cfg_parallel={c.cfg_parallel}, ring={c.ring}, ulysses={c.ulysses})"
                for c in self.valid_layouts(world, num_kv_heads)
            )
            message += (
                f". Valid topologies for {world} ranks and {num_kv_heads} KV heads: {choices}"
            )
        attention = self._sp_attention_problem()
        if attention is not None:
            message = f"{message}; {attention}" if message else attention
        if message:
            raise ValueError(message)

    def _sp_attention_problem(self) -> str | None:
        name = self.sp_attention_name
        try:
            variant = registry.lookup(name)
        except ValueError as unknown:
            return str(unknown)
        if variant.supports(self):
            return None
        fitting = [n for n in registry.names() if registry.lookup(n).supports(self)]
        return (
            f"sp_attention {name!r} needs {variant.requires}, not ulysses={self.ulysses}, "
            f"kv_gather={self.kv_gather}, ring={self.ring}; valid sp_attention for these "
            "degrees: " + (", ".join(fitting) or "(no registered variant)")
        )

    def describe(self) -> str:
        inner = f"kv_gather {self.kv_gather}" if self.kv_gather > 1 else f"ulysses {self.ulysses}"
        return (
            f"{inner}, ring {self.ring}, cfg {self.cfg_parallel}, "
            f"sp attention {self.sp_attention_name}"
        )
