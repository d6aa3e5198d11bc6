"""Step-cache policies by name: the request's `cache` field -> the policy its job runs with on
this rank (`none`, TeaCache, DBCache, each optionally with a TaylorSeer forecast).

Every decision is collective. A policy sums the numerator and the denominator of its relative
change over this rank's real (non-pad) latent rows, per CFG branch, and one all-reduce over the
whole rank group adds them up: the ranks of an SP group contribute their shards, the CFG groups
their branches. Every rank then applies the same rule to the same sums, so all ranks reuse or
compute together and their collectives stay matched. State (the last residuals, the reference
statistic) is kept per branch, so batched branches, CFG-parallel groups that each hold a subset,
and branches that join late (entering the CFG window) all work: a branch without state makes
the whole step compute.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from bagel.kv import Branch
from bagel.step_cache import BlockStates, NoStepCache, StepCache
from serving.errors import InvalidParams
from serving.params import CachePolicy, DBCache, NoCache, TeaCache

# Sums a small fp64 tensor over every rank that takes part in the decision (identity alone).
ReduceSum = Callable[[Tensor], Tensor]
_SLOTS = len(Branch)  # one (numerator, denominator) slot per branch, indexed by Branch - 1


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


@dataclass
class _BranchState:
    reference: Tensor | None = (
        None  # the statistic's reference (TeaCache input, DBCache Fn residual)
    )
    accumulated: float = 0.0  # TeaCache: relative change summed since the last computed step
    residuals: list[tuple[int, BlockStates]] = field(default_factory=list)  # (step, residual)
    pending: Tensor | None = None  # this step's statistic, until the decision is taken


class ResidualStepCache:
    """The shared machinery of TeaCache and DBCache: per-branch state, the collective decision,
    the bookkeeping of cached steps, and the (optionally TaylorSeer-forecast) reused residual.

    `valid_rows` is how many leading latent rows of this rank's shard are real tokens; `reduce`
    sums over every rank of the job."""

    computes_everything = False

    def __init__(self, valid_rows: int, reduce: ReduceSum, taylorseer_order: int = 0) -> None:
        self.valid_rows = valid_rows
        self.reduce = reduce
        self.order = taylorseer_order
        self.states: dict[Branch, _BranchState] = {}
        self.step = 0
        self.total = 0
        self.cached_steps: list[int] = []
        self._step_decisions: list[bool] = []
        self._consecutive = 0

    # ---- the sampler's side --------------------------------------------------------------

    def begin_step(self, step: int, total: int) -> None:
        self.step, self.total = step, total
        self._step_decisions = []

    @property
    def step_was_cached(self) -> bool:
        """Every decision of the step said reuse (the same on every rank: they are collective)."""
        return bool(self._step_decisions) and all(self._step_decisions)

    # ---- the velocity model's side -------------------------------------------------------

    def reuse_middle(
        self, branches: Sequence[Branch], front_in: BlockStates, front_out: BlockStates
    ) -> bool:
        probe = self.probe(front_in, front_out)[:, : self.valid_rows]
        sums = torch.zeros(_SLOTS + 1, 2, dtype=torch.float64, device=probe.device)
        for b, branch in enumerate(branches):
            state = self.states.setdefault(branch, _BranchState())
            # A copy in the model's dtype: the probe may be a captured graph's output buffer,
            # which the next replay overwrites. The sums are taken in fp32, accumulated in fp64.
            current = probe[b].clone()
            if state.reference is None or not state.residuals:
                sums[_SLOTS, 0] += 1  # no state for this branch: the step must compute
            else:
                reference = state.reference.float()
                sums[branch - 1, 0] += (current.float() - reference).abs().sum(dtype=torch.float64)
                sums[branch - 1, 1] += reference.abs().sum(dtype=torch.float64)
            state.pending = current
        reuse = self._decide_together(sums)
        for branch in branches:
            self.after_decision(self.states[branch], reuse)
        return reuse

    def abstain(self) -> None:
        self._decide_together(torch.zeros(_SLOTS + 1, 2, dtype=torch.float64))

    def _decide_together(self, sums: Tensor) -> bool:
        """Sum every rank's statistics, then the same rule on the same sums everywhere."""
        sums = self.reduce(sums).cpu()
        missing = sums[_SLOTS, 0].item() > 0
        changes = {
            Branch(i + 1): (sums[i, 0] / sums[i, 1]).item()
            for i in range(_SLOTS)
            if sums[i, 1].item() > 0
        }
        if missing:
            self.restart()
        reuse = not missing and self.decide(changes)
        self._step_decisions.append(reuse)
        if reuse:
            if self.step not in self.cached_steps:
                self.cached_steps.append(self.step)
            self._consecutive += 1
        else:
            self._consecutive = 0
        return reuse

    def middle_residual(self, branches: Sequence[Branch]) -> BlockStates:
        parts = [self._forecast(self.states[b].residuals) for b in branches]
        return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])

    def store_middle_residual(self, branches: Sequence[Branch], residual: BlockStates) -> None:
        keep = max(1, self.order + 1)
        for b, branch in enumerate(branches):
            state = self.states[branch]
            entry = (self.step, (residual[0][b].clone(), residual[1][b].clone()))
            state.residuals = (state.residuals + [entry])[-keep:]

    def _forecast(self, history: list[tuple[int, BlockStates]]) -> BlockStates:
        """The last residual, or its Taylor forecast at this step from the last computed ones
        (divided differences over their step indices; falls back to a lower order while the
        history is short)."""
        order = min(self.order, len(history) - 1)
        if order <= 0:
            return history[-1][1]
        steps = [s for s, _ in history[-(order + 1) :]]
        values = [r for _, r in history[-(order + 1) :]]
        out = []
        for part in range(2):
            ys = [v[part].float() for v in values]
            # Newton form: divided differences, evaluated at the current step.
            coeffs = list(ys)
            for level in range(1, order + 1):
                for i in range(order, level - 1, -1):
                    coeffs[i] = (coeffs[i] - coeffs[i - 1]) / (steps[i] - steps[i - level])
            result = coeffs[order]
            for i in range(order - 1, -1, -1):
                result = coeffs[i] + (self.step - steps[i]) * result
            out.append(result.to(values[-1][part].dtype))
        return out[0], out[1]

    # ---- what a policy defines -----------------------------------------------------------

    def probe(self, front_in: BlockStates, front_out: BlockStates) -> Tensor:
        """The statistic's tensor, `[B, rows, hidden]`."""
        raise NotImplementedError

    def decide(self, changes: dict[Branch, float]) -> bool:
        """Reuse, given every branch's relative change summed over all ranks."""
        raise NotImplementedError

    def restart(self) -> None:
        """A branch had no state, so the step computes: forget what was accumulated."""

    def after_decision(self, state: _BranchState, reused: bool) -> None:
        raise NotImplementedError


class TeaCacheStepCache(ResidualStepCache):
    """TeaCache: the relative L1 change of the first block's input (the embedded latent tokens:
    BAGEL has no timestep modulation, the time embedding is added to them), accumulated since
    the last computed step; reuse the whole transformer's residual while the sum stays under the
    threshold. The first and the last step always compute."""

    def __init__(self, policy: TeaCache, valid_rows: int, reduce: ReduceSum) -> None:
        super().__init__(valid_rows, reduce, policy.taylorseer_order)
        self.threshold = policy.rel_l1_threshold
        self._accumulated = 0.0

    def layer_ranges(self, num_layers: int) -> tuple[range, range, range]:
        return range(0), range(num_layers), range(num_layers, num_layers)

    def probe(self, front_in: BlockStates, front_out: BlockStates) -> Tensor:
        return front_in[1]

    def decide(self, changes: dict[Branch, float]) -> bool:
        change = max(changes.values(), default=math.inf)
        edge = self.step == 0 or self.step == self.total - 1
        if edge or self._accumulated + change >= self.threshold:
            self._accumulated = 0.0
            return False
        self._accumulated += change
        return True

    def restart(self) -> None:
        self._accumulated = 0.0

    def after_decision(self, state: _BranchState, reused: bool) -> None:
        # The input is compared with the previous step's, computed or not.
        state.reference = state.pending


class DBCacheStepCache(ResidualStepCache):
    """Cache-DiT's DBCache: the first Fn and last Bn blocks run every step; the middle blocks'
    residual is reused while the relative L1 change of the Fn blocks' residual, against its value
    at the last computed step, stays under the threshold, after `max_warmup_steps` and within the
    `max_cached_steps` / `max_continuous_cached_steps` limits (0: none)."""

    def __init__(self, policy: DBCache, valid_rows: int, reduce: ReduceSum) -> None:
        super().__init__(valid_rows, reduce, policy.taylorseer_order)
        self.policy = policy

    def layer_ranges(self, num_layers: int) -> tuple[range, range, range]:
        fn, bn = self.policy.fn_compute_blocks, self.policy.bn_compute_blocks
        return range(fn), range(fn, num_layers - bn), range(num_layers - bn, num_layers)

    def probe(self, front_in: BlockStates, front_out: BlockStates) -> Tensor:
        return front_out[1] - front_in[1]

    def decide(self, changes: dict[Branch, float]) -> bool:
        p = self.policy
        if self.step < p.max_warmup_steps:
            return False
        if p.max_cached_steps and len(self.cached_steps) >= p.max_cached_steps:
            return False
        if p.max_continuous_cached_steps and self._consecutive >= p.max_continuous_cached_steps:
            return False
        return max(changes.values(), default=math.inf) < p.residual_diff_threshold

    def after_decision(self, state: _BranchState, reused: bool) -> None:
        if not reused:  # compared against the last computed step, so error cannot creep
            state.reference = state.pending


PolicyFactory = Callable[[CachePolicy, int, ReduceSum], StepCache]

STEP_CACHES: dict[type, PolicyFactory] = {
    NoCache: lambda policy, valid_rows, reduce: NoStepCache(),
    TeaCache: TeaCacheStepCache,
    DBCache: DBCacheStepCache,
}


def check_step_cache(policy: CachePolicy | None) -> None:
    """InvalidParams unless this server runs `policy` (None: no caching)."""
    if policy is not None and type(policy) not in STEP_CACHES:
        served = ", ".join(cls.__name__ for cls in STEP_CACHES)
        raise InvalidParams(
            f"cache policy {type(policy).__name__} is not served by this diffusion service "
            f"(served: {served})"
        )


def make_step_cache(policy: CachePolicy | None, valid_rows: int, reduce: ReduceSum) -> StepCache:
    """The policy object of one job on this rank (None: no caching); `valid_rows` real rows lead
    its latent shard."""
    check_step_cache(policy)
    if policy is None:
        return NoStepCache()
    return STEP_CACHES[type(policy)](policy, valid_rows, reduce)
