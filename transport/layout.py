"""The KV cache as the transport sees it, and where every byte of it lives in the flat payload.

Payload order: context, layer, K then V; each tensor contiguous `[tokens, kv_heads, head_dim]`,
little-endian. A context that is the start of another (`prefix_of`) takes no payload: its views are
the first tokens of the other's. A `KVLayout` turns a header's numbers into byte ranges and tensor
views. A context
is named by its wire kind (`bagel.v1.ContextKind`, an int); the transport holds no context type of
its own: it reads any object with `keys`, `values` and `next_rope_position` (the model's
`ContextKV`) and hands out per-context tensor views.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

import torch
from torch import Tensor

from protos import kv_pb2

if (
    sys.byteorder != "little"
):  # the wire is little-endian and tensors are sent as they lie in memory
    raise ImportError("transport supports little-endian hosts only")

# The context kinds a stream may carry: every `ContextKind` but UNSPECIFIED, each at most once.
CONTEXT_KINDS: frozenset[int] = frozenset(
    v for v in kv_pb2.ContextKind.values() if v != kv_pb2.CONTEXT_KIND_UNSPECIFIED
)
MAX_CONTEXTS = len(CONTEXT_KINDS)
DTYPE_TO_WIRE: dict[torch.dtype, int] = {
    torch.bfloat16: kv_pb2.DTYPE_BF16,
    torch.float16: kv_pb2.DTYPE_FP16,
    torch.float32: kv_pb2.DTYPE_FP32,
}
WIRE_TO_DTYPE: dict[int, torch.dtype] = {v: k for k, v in DTYPE_TO_WIRE.items()}
KEY, VALUE = 0, 1  # index of K and V inside a layer's pair of segments


class ContextTensors(Protocol):
    """One context's cache as a sender holds it: per layer K and V `[tokens, kv_heads, head_dim]`."""

    keys: Sequence[Tensor]
    values: Sequence[Tensor]
    next_rope_position: int


@dataclass(frozen=True)
class ContextSpec:
    """What the header says about one context; `kind` is a `bagel.v1.ContextKind` value."""

    kind: int
    num_tokens: int
    next_rope_position: int
    prefix_of: int | None = None  # index of the context whose first tokens these are


@dataclass(frozen=True)
class ContextViews:
    """One received context: its header entry and per-layer K and V views into the payload."""

    spec: ContextSpec
    keys: list[Tensor]
    values: list[Tensor]

    @property
    def kind(self) -> int:
        return self.spec.kind

    @property
    def next_rope_position(self) -> int:
        return self.spec.next_rope_position

    @property
    def num_tokens(self) -> int:
        return self.spec.num_tokens


@dataclass(frozen=True)
class KVLayout:
    """Shapes of a whole cache; maps (context, layer, K/V) to byte ranges of the flat payload."""

    dtype: torch.dtype
    num_layers: int
    num_kv_heads: int
    head_dim: int
    contexts: tuple[ContextSpec, ...]

    @classmethod
    def of(cls, contexts: Mapping[int, ContextTensors]) -> KVLayout:
        """The layout of a cache held as tensors, keyed by context kind in payload order; checks
        every tensor agrees with it."""
        if not contexts:
            raise ValueError("a KV cache needs at least one context")
        unknown = sorted(set(map(int, contexts)) - CONTEXT_KINDS)
        if unknown:
            raise ValueError(f"unknown context kinds {unknown}")
        first = next((t for c in contexts.values() for t in c.keys), None)
        if first is None:
            raise ValueError("a KV cache needs at least one layer")
        items = list(contexts.items())
        layers = len(items[0][1].keys)
        layout = cls(
            dtype=first.dtype,
            num_layers=layers,
            num_kv_heads=first.shape[1],
            head_dim=first.shape[2],
            contexts=tuple(
                ContextSpec(int(kind), c.keys[0].shape[0] if c.keys else 0, c.next_rope_position)
                for kind, c in items
            ),
        )
        for ci, (kind, ctx) in enumerate(items):
            if len(ctx.keys) != layers or len(ctx.values) != layers:
                raise ValueError(
                    f"context {ci} (kind {int(kind)}) does not have {layers} layers of K and V"
                )
            for layer in range(layers):
                layout.check_pair(ci, layer, ctx.keys[layer], ctx.values[layer])
        return layout

    def __post_init__(self) -> None:
        problem = self.prefix_problem()
        if problem is not None:
            raise ValueError(problem)

    def prefix_problem(self) -> str | None:
        """Why the contexts' `prefix_of` references cannot hold, or None: each names another
        context that is not itself a prefix and has at least as many tokens."""
        for i, c in enumerate(self.contexts):
            j = c.prefix_of
            if j is None:
                continue
            if not 0 <= j < len(self.contexts) or j == i:
                return f"context {i} is a prefix of context {j}, which is not another context"
            source = self.contexts[j]
            if source.prefix_of is not None:
                return f"context {i} is a prefix of context {j}, itself a prefix"
            if source.num_tokens < c.num_tokens:
                return (
                    f"context {i} ({c.num_tokens} tokens) is a prefix of context {j}, which has "
                    f"only {source.num_tokens}"
                )
        return None

    def check_pair(self, context: int, layer: int, k: Tensor, v: Tensor) -> None:
        """Raise ValueError unless k and v have this layout's shape and dtype for `context`."""
        shape = (self.contexts[context].num_tokens, self.num_kv_heads, self.head_dim)
        for name, t in (("K", k), ("V", v)):
            if tuple(t.shape) != shape or t.dtype != self.dtype:
                raise ValueError(
                    f"context {context} layer {layer} {name}: expected {list(shape)} {self.dtype}, "
                    f"got {list(t.shape)} {t.dtype}"
                )

    @property
    def element_size(self) -> int:
        return self.dtype.itemsize

    def tensor_bytes(self, context: int) -> int:
        """Payload bytes of one K (or V) tensor of `context`: none for a prefix of another."""
        spec = self.contexts[context]
        if spec.prefix_of is not None:
            return 0
        return spec.num_tokens * self.num_kv_heads * self.head_dim * self.element_size

    @cached_property
    def _context_offsets(self) -> tuple[int, ...]:
        offsets = [0]
        for c in range(len(self.contexts)):
            offsets.append(offsets[-1] + 2 * self.num_layers * self.tensor_bytes(c))
        return tuple(offsets)

    @property
    def total_bytes(self) -> int:
        return self._context_offsets[-1]

    def segment(self, context: int, layer: int, kv: int) -> tuple[int, int]:
        """Byte range [start, end) of K (kv=0) or V (kv=1) of `layer` in `context`."""
        size = self.tensor_bytes(context)
        start = self._context_offsets[context] + (2 * layer + kv) * size
        return start, start + size

    def views(self, flat: Tensor) -> list[ContextViews]:
        """Per-context K/V tensor views into `flat` (uint8, `total_bytes` long); no copy."""
        if flat.dtype != torch.uint8 or flat.dim() != 1 or flat.numel() != self.total_bytes:
            raise ValueError(f"flat buffer must be uint8 [{self.total_bytes}]")
        shaped = flat.view(self.dtype) if flat.numel() else flat.new_empty(0, dtype=self.dtype)
        step = self.element_size
        pairs_of: list[list[list[Tensor]]] = []
        for ci, spec in enumerate(self.contexts):
            pairs: list[list[Tensor]] = [[], []]
            if spec.prefix_of is None:  # a prefix is filled from its source below
                shape = (spec.num_tokens, self.num_kv_heads, self.head_dim)
                for kv in (KEY, VALUE):
                    for layer in range(self.num_layers):
                        start, end = self.segment(ci, layer, kv)
                        pairs[kv].append(shaped[start // step : end // step].view(shape))
            pairs_of.append(pairs)
        out = []
        for spec, pairs in zip(self.contexts, pairs_of, strict=True):
            if spec.prefix_of is not None:
                source = pairs_of[spec.prefix_of]
                pairs = [[t[: spec.num_tokens] for t in source[kv]] for kv in (KEY, VALUE)]
            out.append(ContextViews(spec, pairs[KEY], pairs[VALUE]))
        return out


@dataclass
class KVCache:
    """A whole cache in one flat buffer, with per-context tensor views into it."""

    layout: KVLayout
    flat: Tensor
    contexts: list[ContextViews]
    on_release: Callable[[Tensor], None] | None = field(default=None, repr=False)

    @classmethod
    def wrap(
        cls, layout: KVLayout, flat: Tensor, on_release: Callable[[Tensor], None] | None = None
    ) -> KVCache:
        return cls(layout, flat, layout.views(flat), on_release)

    def context(self, kind: int) -> ContextViews | None:
        return next((c for c in self.contexts if c.kind == kind), None)

    def release(self) -> None:
        """Hand the buffer back to its pool; the views must not be used afterwards."""
        flat, self.flat, self.contexts = self.flat, torch.empty(0, dtype=torch.uint8), []
        if self.on_release is not None and flat.numel():
            self.on_release(flat)
        self.on_release = None
