"""broadcast_kv over real gloo process groups: every rank ends up with rank 0's cache."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from tests.helpers.ranks import run_ranks
from transport import BufferPool, Fault, KVCache, KVLayout, TransportError, broadcast_kv
from transport.broadcast import layout_from_tensor, layout_to_tensor

from .factory import make_contexts, raw

TOKENS = (7, 0, 5)  # the unconditional text context is empty


def source_cache(seed: int) -> KVCache:
    contexts = make_contexts(TOKENS, dtype=torch.bfloat16, layers=3, seed=seed)
    payload = b"".join(
        raw(t) for c in contexts.values() for p in zip(c.keys, c.values, strict=True) for t in p
    )
    return KVCache.wrap(
        KVLayout.of(contexts), torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    )


def views_match(cache: KVCache, seed: int) -> bool:
    """This rank's views hold the tensors rank 0 started from, at the right shapes."""
    expected = make_contexts(TOKENS, dtype=torch.bfloat16, layers=3, seed=seed)
    return all(
        kind == b.kind
        and a.next_rope_position == b.next_rope_position
        and all(
            raw(x) == raw(y) and x.shape == y.shape
            for x, y in zip(a.keys + a.values, b.keys + b.values, strict=True)
        )
        for (kind, a), b in zip(expected.items(), cache.contexts, strict=True)
    )


def broadcast_rank(rank: int, world: int, seed: int) -> dict[str, torch.Tensor]:
    cache = source_cache(seed) if rank == 0 else None
    got = broadcast_kv(cache, timeout=timedelta(seconds=30), buffers=BufferPool())
    return {
        "flat": got.flat.clone(),
        "layout": layout_to_tensor(got.layout),
        "views_match": torch.tensor(views_match(got, seed)),
    }


@pytest.mark.parametrize("world", [2, 4])
def test_every_rank_gets_rank0s_cache(world):
    results = run_ranks(world, broadcast_rank, 11, timeout=60)
    source = source_cache(11)
    for rank, result in enumerate(results):
        assert bool(result["views_match"]), f"rank {rank}"
        assert torch.equal(result["flat"], results[0]["flat"])
        assert torch.equal(result["flat"], source.flat)
        assert layout_from_tensor(result["layout"]) == source.layout


def subgroup_rank(rank: int, world: int, seed: int) -> dict[str, torch.Tensor]:
    group = dist.new_group([1, 3])  # every rank takes part in creating it
    if rank not in (1, 3):
        return {"views_match": torch.tensor(True)}
    cache = source_cache(seed) if rank == 1 else None
    got = broadcast_kv(cache, group=group, src=0, timeout=timedelta(seconds=30))
    return {"views_match": torch.tensor(views_match(got, seed) and (got is cache) == (rank == 1))}


def test_broadcast_in_a_subgroup_comes_from_its_first_rank():
    results = run_ranks(4, subgroup_rank, 5, timeout=60)
    assert all(bool(r["views_match"]) for r in results)


def silent_source_rank(rank: int, world: int) -> dict[str, torch.Tensor]:
    if rank == 0:
        time.sleep(2.0)  # never broadcasts
        return {"fault": torch.tensor(-1)}
    try:
        broadcast_kv(None, timeout=timedelta(seconds=0.5))
    except TransportError as e:
        assert "did not complete within 0.5 s" in e.message
        return {"fault": torch.tensor(list(Fault).index(e.fault))}
    return {"fault": torch.tensor(-2)}


def test_a_rank_waiting_on_a_silent_source_times_out_as_unavailable():
    results = run_ranks(2, silent_source_rank, timeout=60)
    assert int(results[1]["fault"]) == list(Fault).index(Fault.UNAVAILABLE)


def test_layout_header_round_trips_and_rejects_garbage():
    layout = source_cache(0).layout
    header = layout_to_tensor(layout)
    assert header.dtype == torch.int64 and header.shape == (32,)
    assert layout_from_tensor(header) == layout
    with pytest.raises(TransportError, match="not a KV layout header"):
        layout_from_tensor(torch.zeros(32, dtype=torch.int64))
    bad = header.clone()
    bad[6] += 1
    with pytest.raises(TransportError, match="does not match"):
        layout_from_tensor(bad)
