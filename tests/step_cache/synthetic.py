"""A step cache driven by synthetic statistics and residuals, so that the right decisions are
known in advance. Written against the generic interface (a registered config and the
`bagel.diffusion.step_cache` seam), so every policy, present or future, runs through it.

Each step gives one scalar per branch, `s`: the latent rows of the first block's input are `s`
and the front layers' output `2 s`, so both statistics (`FRONT_INPUT` and `FRONT_RESIDUAL`) read
`s`. A computed step stores the residual `residual(step, branch)` (a scalar, as full rows)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from bagel.network.kv import Branch
from step_cache.collective import CollectiveStepCache, ReduceSum
from step_cache.policy import PolicyConfig

ROWS, HIDDEN = 3, 2
Residual = Callable[[int, Branch], float | Tensor]


def rows(value: float | Tensor) -> Tensor:
    """`value` as one branch's latent rows `[ROWS, HIDDEN]` (fp32)."""
    return torch.as_tensor(value, dtype=torch.float32).expand(ROWS, HIDDEN).clone()


@dataclass
class Run:
    decisions: list[bool] = field(default_factory=list)
    served: dict[int, dict[Branch, Tensor]] = field(default_factory=dict)  # reused latents
    reduce_calls: int = 0

    @property
    def cached(self) -> list[int]:
        return [step for step, reused in enumerate(self.decisions) if reused]

    def pattern(self) -> str:
        """`C` for a computed step, `R` for a reused one."""
        return "".join("R" if reused else "C" for reused in self.decisions)


def drive(
    config: PolicyConfig,
    stats: Sequence[Mapping[Branch, float]],
    residual: Residual = lambda step, branch: float(step + 1),
    reduce: ReduceSum | None = None,
) -> Run:
    """Run `len(stats)` steps; step `k` runs the branches of `stats[k]`, in that order."""
    run = Run()

    def counting_reduce(x: Tensor) -> Tensor:
        run.reduce_calls += 1
        return x if reduce is None else reduce(x)

    cache = CollectiveStepCache(config, ROWS, counting_reduce)
    for step, per_branch in enumerate(stats):
        branches = tuple(per_branch)
        cache.begin_step(step, len(stats), branches)
        latent_in = torch.stack([rows(per_branch[b]) for b in branches])
        markers = torch.zeros(len(branches), 2, HIDDEN)
        if cache.reuse_middle(branches, (markers, latent_in), (markers, 2 * latent_in)):
            _, latents = cache.middle_residual(branches)
            run.served[step] = {b: latents[i] for i, b in enumerate(branches)}
        else:
            latents = torch.stack([rows(residual(step, b)) for b in branches])
            cache.store_middle_residual(branches, (markers, latents))
        run.decisions.append(cache.step_was_cached)
    return run


def constant(value: float, steps: int, branches=(Branch.COND,)) -> list[dict[Branch, float]]:
    return [dict.fromkeys(branches, value) for _ in range(steps)]


def assert_reuses_when_nothing_changes(config: PolicyConfig, steps: int = 8) -> Run:
    """The property every caching policy must have: with its eager settings and a statistic
    that never changes, it serves some step from the cache, and what it serves is the residual
    stored last (no forecast)."""
    run = drive(config, constant(1.0, steps), residual=lambda step, branch: 7.0)
    assert run.cached, f"{type(config).__name__} never reused a step: {run.pattern()}"
    for step, served in run.served.items():
        assert torch.equal(served[Branch.COND], rows(7.0)), step
    return run
