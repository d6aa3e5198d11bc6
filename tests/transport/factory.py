"""Small KV caches with known contents, and a buffer source that records what it hands out."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from bagel.network.kv import Branch, ContextKV
from transport import ContextViews, FreshBuffers, KVSpec

FINGERPRINT = "test-model-v1"
KINDS = (Branch.COND, Branch.UNCOND_TEXT, Branch.UNCOND_IMG)


def make_contexts(
    tokens: Sequence[int],
    *,
    dtype: torch.dtype = torch.bfloat16,
    layers: int = 3,
    heads: int = 2,
    head_dim: int = 8,
    seed: int = 0,
) -> dict[Branch, ContextKV]:
    """One context per entry of `tokens` (cond, uncond_text, uncond_img), random contents; the
    i-th has next RoPE position `tokens[i] + i`."""
    gen = torch.Generator().manual_seed(seed)

    def tensor(n: int) -> Tensor:
        return torch.randn(n, heads, head_dim, generator=gen).to(dtype)

    return {
        kind: ContextKV(
            [tensor(n) for _ in range(layers)], [tensor(n) for _ in range(layers)], n + i
        )
        for i, (kind, n) in enumerate(zip(KINDS, tokens, strict=False))
    }


def spec_for(contexts: dict[Branch, ContextKV], fingerprint: str = FINGERPRINT) -> KVSpec:
    k = next(t for c in contexts.values() for t in c.keys)
    return KVSpec(fingerprint, len(contexts[Branch.COND].keys), k.shape[1], k.shape[2])


def raw(t: Tensor) -> bytes:
    """The exact bytes of a tensor (bit patterns, so NaNs and -0.0 compare exactly)."""
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def assert_same_cache(sent: dict[Branch, ContextKV], received: list[ContextViews]) -> None:
    assert [c.kind for c in received] == list(sent)
    for a, b in zip(sent.values(), received, strict=True):
        assert b.next_rope_position == a.next_rope_position
        assert len(b.keys) == len(a.keys) and len(b.values) == len(a.values)
        for x, y in zip(a.keys + a.values, b.keys + b.values, strict=True):
            assert y.shape == x.shape and y.dtype == x.dtype
            assert raw(y) == raw(x)


class RecordingBuffers(FreshBuffers):
    """Fresh buffers that remember every size asked for and every buffer not yet given back."""

    def __init__(self) -> None:
        super().__init__()
        self.requested: list[int] = []
        self.outstanding: dict[int, int] = {}

    def take(self, nbytes: int) -> Tensor:
        self.requested.append(nbytes)
        buffer = super().take(nbytes)
        self.outstanding[id(buffer)] = nbytes
        return buffer

    def give_back(self, buffer: Tensor) -> None:
        self.outstanding.pop(id(buffer), None)
