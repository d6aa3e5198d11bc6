"""The residuals a step cache keeps: per CFG branch, what `middle` added at its last computed
steps, as many as the forecast needs. Kept apart from the decision rule, which never sees them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from bagel.diffusion.step_cache import BlockStates
from bagel.network.kv import Branch


class ResidualStore:
    """`keep` residuals per branch, oldest first, each with the step that computed it."""

    def __init__(self, keep: int) -> None:
        if keep < 1:
            raise ValueError(f"a residual store keeps at least one residual, not {keep}")
        self.keep = keep
        self._history: dict[Branch, list[tuple[int, BlockStates]]] = {}

    def add(self, step: int, branches: Sequence[Branch], residual: BlockStates) -> None:
        """`residual` is batched over `branches` (row `b` belongs to `branches[b]`)."""
        for b, branch in enumerate(branches):
            entry = (step, (residual[0][b].clone(), residual[1][b].clone()))
            self._history[branch] = (self._history.get(branch, []) + [entry])[-self.keep :]

    def history(self, branch: Branch) -> list[tuple[int, BlockStates]]:
        return self._history[branch]

    def holds(self, branch: Branch) -> bool:
        return branch in self._history


def stack(parts: Sequence[tuple[Tensor, Tensor]]) -> BlockStates:
    """Per-branch residuals batched again, in the order given."""
    return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
