"""broadcast_kv over real gloo process groups: every rank ends up with rank 0's cache."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

from tests.helpers.ranks import run_ranks
from transport import BufferPool, Fault, KVCache, KVLayout, TransportError, broadcast_kv
from transport.broadcast import layout_from_tensor, layout_to_tensor
from transport.layout import ContextSpec

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


# --- the same logic over threads as ranks (in-process, so mutation testing sees it) ----------


class ThreadCollective:
    """Stands in for `torch.distributed` inside `transport.broadcast`: each thread is one rank of
    `group`; `broadcast` copies the source's tensor to the others when every rank waits on it.
    The broadcast numbered `fail_at` (0: the header) raises as gloo does on a timeout."""

    def __init__(self, world: int, fail_at: int | None = None) -> None:
        self.group = object()
        self.local = threading.local()
        self.barrier = threading.Barrier(world)
        self.fail_at = fail_at
        self.calls: list[tuple[int, int, timedelta]] = []  # (rank, src, timeout) per wait
        self.shapes: list[tuple[int, ...]] = []
        self._slot: Tensor | None = None

    def get_rank(self, group):
        assert group is self.group
        return self.local.rank

    def broadcast(self, tensor, *, group, group_src, async_op=False):
        assert group is self.group
        return self._Work(self, tensor, group_src) if async_op else None

    class _Work:
        def __init__(self, owner: ThreadCollective, tensor: Tensor, src: int) -> None:
            self.owner, self.tensor, self.src = owner, tensor, src

        def wait(self, *, timeout: timedelta) -> bool:
            owner, rank = self.owner, self.owner.local.rank
            owner.calls.append((rank, self.src, timeout))
            if sum(1 for r, _, _ in owner.calls if r == rank) - 1 == owner.fail_at:
                raise RuntimeError("Timed out waiting for the peer")
            if rank == self.src:
                owner._slot = self.tensor.clone()
                owner.shapes.append(tuple(self.tensor.shape))
            owner.barrier.wait(5)
            if rank != self.src:
                self.tensor.copy_(owner._slot)
            owner.barrier.wait(5)
            return True


def broadcast_on_threads(
    collective: ThreadCollective, source: KVCache | None, src: int, **kwargs
) -> list[KVCache | BaseException]:
    """broadcast_kv on every rank of `collective`, rank `src` passing `source`."""
    world = collective.barrier.parties
    results: list[KVCache | BaseException] = [RuntimeError("not run")] * world

    if src:  # else broadcast_kv's default source, rank 0
        kwargs["src"] = src

    def rank_main(rank: int) -> None:
        collective.local.rank = rank
        try:
            cache = source if rank == src else None
            results[rank] = broadcast_kv(cache, group=collective.group, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            results[rank] = e

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results


def test_every_thread_rank_gets_the_source_cache_and_the_source_keeps_its_own(monkeypatch):
    collective = ThreadCollective(3)
    monkeypatch.setattr("transport.broadcast.dist", collective)
    source, pool, timeout = source_cache(4), BufferPool(), timedelta(seconds=7)
    results = broadcast_on_threads(collective, source, 1, timeout=timeout, buffers=pool)
    assert results[1] is source
    for rank in (0, 2):
        got = results[rank]
        assert isinstance(got, KVCache) and got.flat.dtype == torch.uint8
        assert got.layout == source.layout and views_match(got, 4)
        assert torch.equal(got.flat, source.flat)
    assert {(src, t) for _, src, t in collective.calls} == {(1, timeout)}
    assert collective.shapes == [(32,), (source.layout.total_bytes,)]
    results[0].release()
    assert pool.idle_bytes == source.layout.total_bytes  # receivers' buffers come from `buffers`


def test_without_a_pool_receivers_get_fresh_buffers_and_wait_the_default_timeout(monkeypatch):
    collective = ThreadCollective(2)
    monkeypatch.setattr("transport.broadcast.dist", collective)
    source = source_cache(6)
    results = broadcast_on_threads(collective, source, 0, device="cpu")  # rank 0 by default
    assert results[0] is source and views_match(results[1], 6)
    assert {t for _, _, t in collective.calls} == {timedelta(seconds=60)}


def test_an_empty_cache_sends_only_the_header(monkeypatch):
    contexts = make_contexts((0,), layers=2)
    empty = KVCache.wrap(KVLayout.of(contexts), torch.empty(0, dtype=torch.uint8))
    collective = ThreadCollective(2)
    monkeypatch.setattr("transport.broadcast.dist", collective)
    results = broadcast_on_threads(collective, empty, 0)
    assert collective.shapes == [(32,)]
    assert results[1].layout == empty.layout and results[1].flat.numel() == 0


def test_the_source_rank_without_a_cache_is_a_value_error(monkeypatch):
    collective = ThreadCollective(1)
    monkeypatch.setattr("transport.broadcast.dist", collective)
    [error] = broadcast_on_threads(collective, None, 0)
    assert isinstance(error, ValueError) and str(error) == "the source rank must pass the cache"


@pytest.mark.parametrize(("fail_at", "what"), [(0, "header"), (1, "payload (2304 bytes)")])
def test_a_broadcast_that_times_out_is_unavailable_and_receivers_give_their_buffer_back(
    monkeypatch, fail_at, what
):
    collective = ThreadCollective(2, fail_at=fail_at)
    monkeypatch.setattr("transport.broadcast.dist", collective)
    source, pool = source_cache(8), BufferPool()
    assert source.layout.total_bytes == 2304
    results = broadcast_on_threads(
        collective, source, 0, timeout=timedelta(seconds=0.5), buffers=pool
    )
    for error in results:
        assert isinstance(error, TransportError) and error.fault is Fault.UNAVAILABLE
        assert error.message == (
            f"broadcast of the KV {what} did not complete within 0.5 s: "
            "Timed out waiting for the peer"
        )
        assert isinstance(error.__cause__, RuntimeError)
    assert pool.idle_bytes == (2304 if fail_at == 1 else 0)
    assert views_match(source, 8)  # the source's own cache is untouched


@pytest.mark.parametrize(
    "changes",
    [{0: 0}, {1: 99}, {5: 0}, {5: 4, 16: 1}, {7: 99}, {11: "kind of context 0"}],
    ids=["magic", "dtype", "no-contexts", "a-fourth-context", "kind", "a-kind-twice"],
)
def test_a_header_with_any_one_bad_field_is_not_a_layout_header(changes):
    header = layout_to_tensor(source_cache(0).layout)
    for index, value in changes.items():
        header[index] = header[7] if value == "kind of context 0" else value
    with pytest.raises(TransportError, match="^broadcast header is not a KV layout header$") as e:
        layout_from_tensor(header)
    assert e.value.fault is Fault.CONTRACT


def test_a_header_of_the_wrong_length_or_total_is_a_contract_fault():
    header = layout_to_tensor(source_cache(0).layout)
    with pytest.raises(TransportError, match="not a KV layout header") as e:
        layout_from_tensor(header[:31])
    assert e.value.fault is Fault.CONTRACT
    header[6] -= 1
    with pytest.raises(TransportError, match="^broadcast header total does not match") as e:
        layout_from_tensor(header)
    assert e.value.fault is Fault.CONTRACT


def test_a_layout_with_one_context_round_trips_through_the_header():
    layout = KVLayout.of(make_contexts((3,), dtype=torch.float32, layers=1))
    header = layout_to_tensor(layout)
    assert header.dtype == torch.int64
    assert layout_from_tensor(header) == layout


def test_more_contexts_than_the_header_holds_is_a_value_error():
    spec = ContextSpec(1, 1, 1)
    layout = KVLayout(torch.float32, 1, 1, 1, (spec,) * 4)
    with pytest.raises(ValueError, match="^at most 3 contexts fit the broadcast header$"):
        layout_to_tensor(layout)


def test_the_header_lists_each_context_with_minus_one_for_no_prefix():
    specs = (ContextSpec(1, 5, 6), ContextSpec(2, 3, 3, prefix_of=0))
    layout = KVLayout(torch.bfloat16, 2, 1, 4, specs)
    header = layout_to_tensor(layout).tolist()
    assert header[5:7] == [2, layout.total_bytes]
    assert header[7:15] == [1, 5, 6, -1, 2, 3, 3, 0]
    assert header[15:] == [0] * 17


def test_a_header_counting_more_contexts_than_it_holds_is_not_a_layout_header():
    header = layout_to_tensor(source_cache(0).layout)
    assert header[5] == 3
    header[5], header[19] = 4, int(header[7])  # a fourth context, of a kind the header knows
    with pytest.raises(TransportError, match="^broadcast header is not a KV layout header$") as e:
        layout_from_tensor(header)
    assert e.value.fault is Fault.CONTRACT


def test_a_header_whose_contexts_make_no_layout_is_a_contract_fault_saying_why():
    header = layout_to_tensor(source_cache(0).layout)
    header[10] = 0  # context 0 a prefix of itself
    with pytest.raises(TransportError) as e:
        layout_from_tensor(header)
    assert e.value.message == (
        "broadcast header: context 0 is a prefix of context 0, which is not another context"
    )
    assert e.value.fault is Fault.CONTRACT
