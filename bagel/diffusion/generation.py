"""The velocity model of one request: the generation block over each CFG branch's prefix.

It owns the per-request state that does not change between steps (padded prefixes, table rows of
the latent tokens, the marker ids) and runs the requested branches as one batched forward.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from bagel.diffusion.step_cache import NoStepCache, StepCache
from bagel.kernels.graphs import graph_or_eager
from bagel.network.attention import BlockAttention, full_block_attention
from bagel.network.kv import Branch, ContextKV
from bagel.network.layers import TokenRows
from bagel.network.model import Bagel, BranchPrefix


class ForwardGraphs:
    """Generation forwards captured as CUDA graphs, kept across requests.

    A capture is fixed to its shapes (branches, prefix lengths, latent tokens) and to the
    addresses of its inputs, so each entry keeps its own prefix and table-row tensors; a later
    request of the same shapes copies its KV into them and replays. Owned by whoever outlives
    requests (a diffusion rank, a pipeline); at most `max_entries` captures are kept.
    """

    def __init__(self, max_entries: int = 8) -> None:
        # Two branch sets (with and without CFG) times up to three layer ranges (a step cache's
        # front, middle and back) make six captures per request shape.
        self.max_entries = max_entries
        self.pool = None
        self._entries: OrderedDict[tuple, _Capture] = OrderedDict()
        self._fixed: OrderedDict[tuple, Callable[..., Tensor]] = OrderedDict()

    def run(
        self,
        branches: tuple[Branch, ...],
        prefix: BranchPrefix,
        pos_ids: Tensor,
        inputs: tuple[Tensor, ...],
        forward_for: Callable[[BranchPrefix, Tensor], Callable[..., Any]],
        capture_key: tuple = (),
    ) -> Any:
        """`forward_for(prefix, pos_ids)(*inputs)`, replayed from a capture of the same key and
        shapes; its output (a tensor or a tuple of them) is overwritten by the next replay of
        the same capture."""
        key = (
            capture_key,
            branches,
            tuple(k.shape for k in prefix.keys[:1]),
            prefix.lengths,
            tuple(tuple(x.shape) for x in inputs),
        )
        entry = self._entries.get(key)
        if entry is None:
            if self.pool is None and inputs[0].is_cuda:
                self.pool = torch.cuda.graph_pool_handle()
            static = prefix.clone()
            static_ids = pos_ids.clone()
            call = graph_or_eager(forward_for(static, static_ids), inputs, self.pool)
            entry = self._entries[key] = _Capture(call, static, static_ids, prefix, pos_ids)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        self._entries.move_to_end(key)
        # A request's KV goes into the captured buffers once, not at every step.
        if entry.loaded[0] is not prefix or entry.loaded[1] is not pos_ids:
            entry.prefix.copy_(prefix)
            entry.pos_ids.copy_(pos_ids)
            entry.loaded = (prefix, pos_ids)
        return entry.call(*inputs)

    def run_fixed(
        self, key: tuple, fn: Callable[..., Tensor], inputs: tuple[Tensor, ...], keep: int = 2
    ) -> Tensor:
        """`fn(*inputs)` for another fixed-shape GPU call that never runs during a forward (the
        VAE decode), replayed from a capture in the forwards' memory pool: its activations
        reuse the forwards' memory instead of adding to it. `key` names `fn` and whatever it
        binds; the input shapes are added to it. The output, like every capture's in the pool,
        holds only until the next replay of any of them: consume it first. At most `keep` such
        captures are kept."""
        key = (key, tuple(tuple(x.shape) for x in inputs))
        call = self._fixed.get(key)
        if call is None:
            if self.pool is None and inputs[0].is_cuda:
                self.pool = torch.cuda.graph_pool_handle()
            call = self._fixed[key] = graph_or_eager(fn, inputs, self.pool)
            while len(self._fixed) > keep:
                self._fixed.popitem(last=False)
        self._fixed.move_to_end(key)
        return call(*inputs)

    def clear(self) -> None:
        """Drop every capture (before the process group its collectives use goes away).

        It does not wait for the GPU: a replay stuck in a dead peer's collective ends only when
        the group is destroyed (aborted), which must not wait on it in turn. A graph still
        running when it is dropped is freed when it finishes."""
        self._entries.clear()
        self._fixed.clear()
        self.pool = None


class _Capture:
    """One kept capture and the tensors its graph reads."""

    def __init__(
        self,
        call: Callable[[Tensor, Tensor], Tensor],
        prefix: BranchPrefix,
        pos_ids: Tensor,
        src_prefix: BranchPrefix,
        src_ids: Tensor,
    ) -> None:
        self.call = call
        self.prefix = prefix  # the captured graph reads these tensors
        self.pos_ids = pos_ids
        # Whose contents they hold now (by identity; kept alive until the next request).
        self.loaded: tuple[BranchPrefix, Tensor] = (src_prefix, src_ids)


class BlockVelocity:
    """`(x_t, t, branches) -> {branch: velocity}` for a fixed set of prefilled contexts.

    `x_t` holds the latent tokens this process owns (all of them, or a shard whose table rows
    are `pos_ids`). With `batch_branches` the requested branches share one forward.
    """

    def __init__(
        self,
        model: Bagel,
        contexts: Mapping[Branch, ContextKV],
        pos_ids: Tensor,
        marker_ids: tuple[int, int],
        attention: BlockAttention = full_block_attention,
        batch_branches: bool = True,
        graphs: ForwardGraphs | None = None,
        capture_key: tuple = (),
        step_cache: StepCache | None = None,
    ) -> None:
        """`capture_key` names what a captured forward depends on beyond the shapes of its
        inputs, such as how `attention` splits the latents over ranks: captures are reused only
        for the same key. `step_cache` is asked once per forward whether to reuse the middle
        layers (default: never)."""
        device = model.vae2llm.weight.device
        embed = model.language_model.model.embed_tokens
        if isinstance(embed, TokenRows) and not embed.holds(marker_ids):
            raise ValueError(f"marker ids {marker_ids} are not among the model's token rows")
        self.model = model
        self.contexts = dict(contexts)
        self.pos_ids = pos_ids.to(device)
        self.marker_ids = torch.tensor(marker_ids, device=device)
        self.attention = attention
        self.batch_branches = batch_branches
        self._prefixes: dict[tuple[Branch, ...], BranchPrefix] = {}
        self.graphs = graphs  # on a CPU its entries run eagerly, through the same buffers
        self.capture_key = (tuple(marker_ids), *capture_key)
        self.step_cache: StepCache = step_cache if step_cache is not None else NoStepCache()

    def _prefix(self, branches: tuple[Branch, ...]) -> BranchPrefix:
        if branches not in self._prefixes:
            self._prefixes[branches] = BranchPrefix.from_contexts(
                [self.contexts[b] for b in branches]
            )
        return self._prefixes[branches]

    def _forward_fn(
        self, prefix: BranchPrefix, pos_ids: Tensor
    ) -> Callable[[Tensor, Tensor], Tensor]:
        # A captured graph may outlive `self`: what this binds besides its arguments (the model,
        # the marker ids, which `capture_key` names, and the attention) must serve any request
        # of the same key; the capture keeps it alive.
        model, markers, attention = self.model, self.marker_ids, self.attention

        def forward(x: Tensor, t: Tensor) -> Tensor:
            return model.forward_block(x, t, pos_ids, markers, prefix, attention)

        return forward

    def _forward(
        self, x_t: Tensor, t: Tensor, branches: tuple[Branch, ...]
    ) -> dict[Branch, Tensor]:
        device = self.pos_ids.device
        # non_blocking: a blocking copy from the host would wait for every queued kernel, so the
        # host could not run ahead and queue the next step while this one computes.
        x = x_t.to(device, torch.float32)
        t = t.to(device, torch.float32, non_blocking=True)
        prefix = self._prefix(branches)
        if not self.step_cache.computes_everything:
            v = self._forward_in_ranges(x, t, prefix, branches)
        elif self.graphs is None:
            v = self._forward_fn(prefix, self.pos_ids)(x, t)
        else:
            v = self.graphs.run(
                branches, prefix, self.pos_ids, (x, t), self._forward_fn, self.capture_key
            )
        return {b: v[i].to(x_t.device, copy=True) for i, b in enumerate(branches)}

    def _forward_in_ranges(
        self, x: Tensor, t: Tensor, prefix: BranchPrefix, branches: tuple[Branch, ...]
    ) -> Tensor:
        """The forward split where the step cache says, its middle reused when it decides so.
        With graphs, the ranges are three captures; the decision runs between them."""
        cache = self.step_cache
        front, middle, back = cache.layer_ranges(len(self.model.layers))
        ranges = {"front": front, "middle": middle, "back": back}

        def run(name: str, *inputs: Tensor):
            if self.graphs is None:
                return self._range_fn(name, ranges[name], prefix, self.pos_ids)(*inputs)
            return self.graphs.run(
                branches,
                prefix,
                self.pos_ids,
                inputs,
                lambda p, ids: self._range_fn(name, ranges[name], p, ids),
                (*self.capture_key, name, ranges[name]),
            )

        front_in_joint, front_in_latent, joint, latent = run("front", x, t)
        if cache.reuse_middle(branches, (front_in_joint, front_in_latent), (joint, latent)):
            residual = cache.middle_residual(branches)
            joint, latent = joint + residual[0], latent + residual[1]
        else:
            out_joint, out_latent = run("middle", joint, latent)
            cache.store_middle_residual(branches, (out_joint - joint, out_latent - latent))
            joint, latent = out_joint, out_latent
        return run("back", joint, latent)

    def _range_fn(
        self, name: str, layers: range, prefix: BranchPrefix, pos_ids: Tensor
    ) -> Callable[..., Any]:
        """One range of the forward as a function of its tensor inputs. `front` embeds and
        returns (its input states, its output states); `middle` maps states to states; `back`
        ends in the velocity. Like `_forward_fn`, it binds only what any request of the same
        capture key may share."""
        model, markers, attention = self.model, self.marker_ids, self.attention
        batch = len(prefix.lengths)

        @torch.no_grad()
        def front(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            joint, latent = model.embed_block(x, t, pos_ids, markers, batch)
            out = model.forward_layers(joint, latent, prefix, attention, layers)
            return joint, latent, *out

        @torch.no_grad()
        def middle(joint: Tensor, latent: Tensor) -> tuple[Tensor, Tensor]:
            return model.forward_layers(joint, latent, prefix, attention, layers)

        @torch.no_grad()
        def back(joint: Tensor, latent: Tensor) -> Tensor:
            _, latent = model.forward_layers(joint, latent, prefix, attention, layers)
            return model.velocity(latent)

        return {"front": front, "middle": middle, "back": back}[name]

    def __call__(self, x_t: Tensor, t: Tensor, branches: Sequence[Branch]) -> dict[Branch, Tensor]:
        branches = tuple(branches)
        if self.batch_branches:
            return self._forward(x_t, t, branches)
        out: dict[Branch, Tensor] = {}
        for b in branches:
            out.update(self._forward(x_t, t, (b,)))
        return out
