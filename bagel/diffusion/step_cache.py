"""The step-cache seam: where a policy may stand in a cached residual for part of a forward.

A generation forward runs its decoder layers in three ranges, which a policy chooses:
`front` (always computed), `middle` (computed, or replaced by the residual it added at the last
step that computed it) and `back` (always computed). The sampler tells the policy when a step
begins and which branches it runs; the velocity model asks it once per forward, after `front`, whether to reuse `middle`.

The model knows nothing of ranks: a policy whose decision depends on data must take it the same
way on every rank (the diffusion service gives its policies a collective for that), or ranks
would run different layers and their collectives would deadlock.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from torch import Tensor

from bagel.network.kv import Branch

# Hidden states of the generation block: (markers `[B, 2, hidden]`, latents `[B, n, hidden]`).
BlockStates = tuple[Tensor, Tensor]


class StepCache(Protocol):
    """One request's step-cache policy; state is kept per set of branches a forward runs."""

    def begin_step(self, step: int, total: int, branches: Sequence[Branch]) -> None:
        """Step `step` (0-based) of `total` begins; it runs `branches` (on some rank)."""
        ...

    def layer_ranges(self, num_layers: int) -> tuple[range, range, range]:
        """(front, middle, back): consecutive ranges covering `range(num_layers)`."""
        ...

    def reuse_middle(
        self, branches: Sequence[Branch], front_in: BlockStates, front_out: BlockStates
    ) -> bool:
        """Whether this forward skips `middle` and adds `middle_residual` instead."""
        ...

    def abstain(self) -> None:
        """This process runs no forward in this step but takes part in the decision (a
        collective policy must join its collective)."""
        ...

    def middle_residual(self, branches: Sequence[Branch]) -> BlockStates:
        """What `middle` added at the last forward of `branches` that ran it."""
        ...

    def store_middle_residual(self, branches: Sequence[Branch], residual: BlockStates) -> None:
        """`middle` ran: remember what it added."""
        ...

    @property
    def step_was_cached(self) -> bool:
        """Whether every forward of the step just run reused `middle`."""
        ...

    @property
    def computes_everything(self) -> bool:
        """True when the policy never reuses: the forward runs whole, as one piece."""
        ...


class NoStepCache:
    """The `none` policy: every layer of every step is computed."""

    computes_everything = True
    step_was_cached = False

    def begin_step(self, step: int, total: int, branches: Sequence[Branch]) -> None:
        pass

    def layer_ranges(self, num_layers: int) -> tuple[range, range, range]:
        return range(0), range(num_layers), range(num_layers, num_layers)

    def reuse_middle(
        self, branches: Sequence[Branch], front_in: BlockStates, front_out: BlockStates
    ) -> bool:
        return False

    def abstain(self) -> None:
        pass

    def middle_residual(self, branches: Sequence[Branch]) -> BlockStates:
        raise RuntimeError("the none policy keeps no residual")

    def store_middle_residual(self, branches: Sequence[Branch], residual: BlockStates) -> None:
        pass
