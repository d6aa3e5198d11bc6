"""The step cache one job runs on one rank: `bagel.diffusion.step_cache`'s seam served by a
registered policy's rule, a residual store and the TaylorSeer calibrator.

Every decision is taken once for all ranks. For a rule with a statistic, each rank sums the
numerator and the denominator of the relative change over its real (non-pad) latent rows, per
CFG branch, and one all-reduce over every rank adds them up: the ranks of an SP group contribute
their shards, the CFG groups their branches. Every rank then applies the same rule to the same
sums. A rule without a statistic decides from the step alone: no probe, no all-reduce. Whether
a step's branch has a residual yet (a branch entering the CFG window has none, and its step must
compute) is known on every rank from the steps' branch lists and the past decisions, so it
needs no communication either.

State that follows a branch (its reference statistic, its residuals) lives on the ranks that run
that branch. The velocity model must therefore run each branch on the same ranks for the whole
job (`diffusion_service.velocity` gives every branch one owner CFG group).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from bagel.diffusion.step_cache import BlockStates, NoStepCache, StepCache
from bagel.network.kv import Branch
from step_cache.policy import PolicyConfig, Statistic, Step
from step_cache.store import ResidualStore, stack
from step_cache.taylorseer import TaylorSeer

# Sums a small fp64 tensor over every rank that takes part in the decision (identity alone).
ReduceSum = Callable[[Tensor], Tensor]
_SLOTS = len(Branch)  # one (numerator, denominator) row per branch, indexed by Branch - 1


def world_sum(
    device: torch.device | str = "cpu", group: dist.ProcessGroup | None = None
) -> ReduceSum:
    """`ReduceSum` over `group` (the whole world by default) on `device` (NCCL: the rank's GPU);
    identity without torch.distributed."""

    def reduce_sum(x: Tensor) -> Tensor:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return x
        x = x.to(device, copy=True)
        dist.all_reduce(x, group=group)
        return x

    return reduce_sum


def measure(statistic: Statistic, front_in: BlockStates, front_out: BlockStates) -> Tensor:
    """The latent rows `[B, rows, hidden]` whose change `statistic` reads."""
    if statistic is Statistic.FRONT_INPUT:
        return front_in[1]
    return front_out[1] - front_in[1]


class CollectiveStepCache:
    """`bagel.diffusion.step_cache.StepCache` for one job on one rank. `valid_rows` real rows lead
    this rank's latent shard; `reduce` sums over every rank of the job."""

    computes_everything = False

    def __init__(self, config: PolicyConfig, valid_rows: int, reduce: ReduceSum) -> None:
        policy = config.policy()
        if policy is None:
            raise ValueError(f"{type(config).__name__} computes every step: use NoStepCache")
        self.policy = policy
        self.forecaster = TaylorSeer.of(config)
        self.store = ResidualStore(self.forecaster.history_length)
        self.valid_rows = valid_rows
        self.reduce = reduce
        self.references: dict[Branch, Tensor] = {}
        # Steps finished so far served from the cache, in all and in a row.
        self._cached = self._consecutive = 0
        self._computed: set[Branch] = set()  # branches a computed step ran: the same everywhere
        self._step = Step(0, 0, 0, 0)
        self._branches: tuple[Branch, ...] = ()
        self._fresh = True
        self._decisions: list[bool] = []

    # ---- the sampler's side --------------------------------------------------------------

    def begin_step(self, step: int, total: int, branches: Sequence[Branch]) -> None:
        self._finish_step()
        self._step = Step(step, total, self._cached, self._consecutive)
        self._branches = tuple(branches)
        self._fresh = any(b not in self._computed for b in self._branches)

    def _finish_step(self) -> None:
        if not self._decisions:
            return
        if self.step_was_cached:
            self._cached += 1
            self._consecutive += 1
        else:
            self._consecutive = 0
            self._computed.update(self._branches)
        self._decisions = []

    @property
    def step_was_cached(self) -> bool:
        """Every decision of the step said reuse (the same on every rank)."""
        return bool(self._decisions) and all(self._decisions)

    # ---- the velocity model's side -------------------------------------------------------

    def layer_ranges(self, num_layers: int) -> tuple[range, range, range]:
        return self.policy.layer_ranges(num_layers)

    def reuse_middle(
        self, branches: Sequence[Branch], front_in: BlockStates, front_out: BlockStates
    ) -> bool:
        statistic = self.policy.statistic
        if statistic is None:
            return self._decide(0.0)
        probe = measure(statistic, front_in, front_out)[:, : self.valid_rows]
        sums = torch.zeros(_SLOTS, 2, dtype=torch.float64, device=probe.device)
        pending = {}
        for b, branch in enumerate(branches):
            # A copy: the probe may be a captured graph's output buffer, which the next replay
            # overwrites. The sums are taken in fp32, accumulated in fp64.
            current = probe[b].clone()
            reference = self.references.get(branch)
            if reference is not None:
                reference = reference.float()
                sums[branch - 1, 0] += (current.float() - reference).abs().sum(dtype=torch.float64)
                sums[branch - 1, 1] += reference.abs().sum(dtype=torch.float64)
            pending[branch] = current
        reuse = self._decide(self._change(sums))
        if statistic is Statistic.FRONT_INPUT or not reuse:
            # The input is compared with the previous step's; a residual with the last
            # computed step's, so that error cannot creep.
            self.references.update(pending)
        return reuse

    def abstain(self) -> None:
        if self.policy.statistic is None:
            self._decide(0.0)
        else:
            self._decide(self._change(torch.zeros(_SLOTS, 2, dtype=torch.float64)))

    def _change(self, sums: Tensor) -> float:
        """The largest relative change over the branches, from every rank's sums."""
        sums = self.reduce(sums).cpu()
        changes = [(sums[i, 0] / sums[i, 1]).item() for i in range(_SLOTS) if sums[i, 1] > 0]
        return max(changes, default=math.inf)

    def _decide(self, change: float) -> bool:
        reuse = not self._fresh and self.policy.reuse(self._step, change)
        self.policy.record(self._step, change, reuse)
        self._decisions.append(reuse)
        return reuse

    def middle_residual(self, branches: Sequence[Branch]) -> BlockStates:
        return stack(
            [self.forecaster.forecast(self.store.history(b), self._step.index) for b in branches]
        )

    def store_middle_residual(self, branches: Sequence[Branch], residual: BlockStates) -> None:
        self.store.add(self._step.index, branches, residual)


def make_step_cache(config: PolicyConfig | None, valid_rows: int, reduce: ReduceSum) -> StepCache:
    """The step cache of one job on this rank (None: no caching); `config` passed the request's
    validation (`serving.params.validate`) on the service."""
    if config is None or config.policy() is None:
        return NoStepCache()
    return CollectiveStepCache(config, valid_rows, reduce)
