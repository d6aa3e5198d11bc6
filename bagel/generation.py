"""The velocity model of one request: the generation block over each CFG branch's prefix.

It owns the per-request state that does not change between steps (padded prefixes, table rows of
the latent tokens, the marker ids) and runs the requested branches as one batched forward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from bagel.attention import BlockAttention, full_block_attention
from bagel.model import Bagel, BranchPrefix, ContextKV


def latent_position_ids(rows: int, cols: int, max_latent_size: int) -> Tensor:
    """Table rows of a `rows x cols` latent grid, row-major: `row * max_latent_size + col`."""
    r = torch.arange(rows)[:, None]
    c = torch.arange(cols)[None, :]
    return (r * max_latent_size + c).flatten()


class BlockVelocity:
    """`(x_t, t, branches) -> {branch: velocity}` for a fixed set of prefilled contexts.

    `x_t` holds the latent tokens this process owns (all of them, or a shard whose table rows
    are `pos_ids`). With `batch_branches` the requested branches share one forward.
    """

    def __init__(
        self,
        model: Bagel,
        contexts: Mapping[str, ContextKV],
        pos_ids: Tensor,
        marker_ids: tuple[int, int],
        attention: BlockAttention = full_block_attention,
        batch_branches: bool = True,
    ) -> None:
        device = model.vae2llm.weight.device
        self.model = model
        self.contexts = dict(contexts)
        self.pos_ids = pos_ids.to(device)
        self.marker_ids = torch.tensor(marker_ids, device=device)
        self.attention = attention
        self.batch_branches = batch_branches
        self._prefixes: dict[tuple[str, ...], BranchPrefix] = {}

    def _prefix(self, branches: tuple[str, ...]) -> BranchPrefix:
        if branches not in self._prefixes:
            self._prefixes[branches] = BranchPrefix.from_contexts(
                [self.contexts[b] for b in branches]
            )
        return self._prefixes[branches]

    def _forward(self, x_t: Tensor, t: Tensor, branches: tuple[str, ...]) -> dict[str, Tensor]:
        device = self.pos_ids.device
        v = self.model.forward_block(
            x_t.to(device),
            t.to(device),
            self.pos_ids,
            self.marker_ids,
            self._prefix(branches),
            self.attention,
        )
        return {b: v[i].to(x_t.device) for i, b in enumerate(branches)}

    def __call__(self, x_t: Tensor, t: Tensor, branches: Sequence[str]) -> dict[str, Tensor]:
        branches = tuple(branches)
        if self.batch_branches:
            return self._forward(x_t, t, branches)
        out: dict[str, Tensor] = {}
        for b in branches:
            out.update(self._forward(x_t, t, (b,)))
        return out
