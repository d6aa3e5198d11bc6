"""`KVLayout` and `KVCache`: contexts are found by their wire kind."""

from __future__ import annotations

import torch

from transport import KVCache, KVLayout

from .factory import KINDS, make_contexts


def test_a_cache_finds_a_context_by_kind_and_none_for_a_kind_it_lacks():
    contexts = make_contexts((3, 2), dtype=torch.float32, layers=1)
    layout = KVLayout.of(contexts)
    cache = KVCache.wrap(layout, torch.zeros(layout.total_bytes, dtype=torch.uint8))
    assert cache.context(int(KINDS[1])).num_tokens == 2
    assert cache.context(int(KINDS[2])) is None


def test_release_hands_the_buffer_back_once_and_leaves_an_empty_byte_buffer():
    contexts = make_contexts((3,), dtype=torch.float32, layers=1)
    layout = KVLayout.of(contexts)
    given_back = []
    cache = KVCache.wrap(
        layout, torch.zeros(layout.total_bytes, dtype=torch.uint8), given_back.append
    )
    cache.release()
    cache.release()
    assert [t.numel() for t in given_back] == [layout.total_bytes]
    assert cache.flat.dtype == torch.uint8 and cache.flat.numel() == 0 and cache.contexts == []
    assert cache.on_release is None
    unowned = KVCache.wrap(layout, torch.zeros(layout.total_bytes, dtype=torch.uint8))
    unowned.release()  # nothing to hand back to
    assert unowned.flat.numel() == 0
