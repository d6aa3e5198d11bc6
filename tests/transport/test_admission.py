"""Admission of KV uploads (`transport.admission`) on a clock the tests move: a stale upload gives
its room to one that needs it, stalest first; a fresh one does not; an upload behind the minimum
rate counts as stale; and through `receive_kv`, an evicted upload ends at once, its buffer given
back, while a newcomer waits for the room."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from transport import FrameAssembler, TransportError, UploadBudget, receive_kv, status_code
from transport.admission import Upload
from transport.rpc import _Waker

from .factory import RecordingBuffers
from .test_faults import SPEC, frames


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def evictions(upload: Upload) -> list[TransportError]:
    seen: list[TransportError] = []
    upload.evict = seen.append
    return seen


def test_a_fresh_holder_keeps_its_room_and_the_newcomer_is_refused():
    clock = Clock()
    budget = UploadBudget(100, stall_s=1.0, clock=clock)
    holder = budget.reserve(100)
    evicted = evictions(holder)
    clock.now += 0.9
    with pytest.raises(TransportError) as info:
        budget.reserve(1)
    assert status_code(info.value) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert evicted == [] and budget.held_bytes == 100 and budget.uploads == 1


def test_silent_holders_give_way_stalest_first_and_only_as_many_as_needed():
    clock = Clock()
    budget = UploadBudget(300, stall_s=1.0, min_rate=1.0, clock=clock)  # only silence counts
    oldest, middle, young = budget.reserve(100), budget.reserve(100), budget.reserve(100)
    seen = {name: evictions(u) for name, u in (("old", oldest), ("mid", middle), ("young", young))}
    clock.now += 0.5
    budget.progress(middle, 10)
    clock.now += 0.3
    budget.progress(young, 10)
    clock.now += 1.5  # silent: oldest 2.3 s, middle 1.8 s, young 1.5 s
    newcomer = budget.reserve(150)
    assert [len(seen[n]) for n in ("old", "mid", "young")] == [1, 1, 0]
    assert budget.held_bytes == 250 and budget.uploads == 2 and budget.evicted == 2
    error = seen["old"][0]
    assert status_code(error) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.message.startswith("upload evicted after 2.3 s without progress (0 of 100 ")
    assert oldest.reserved == 0 and newcomer.reserved == 150
    budget.release(oldest)  # the evicted upload's own release changes nothing
    assert budget.held_bytes == 250


def test_an_upload_behind_the_minimum_rate_is_stale_though_it_keeps_sending():
    clock = Clock()
    budget = UploadBudget(1000, stall_s=1.0, min_rate=100.0, clock=clock)
    trickle = budget.reserve(1000)
    seen = evictions(trickle)
    for _ in range(30):  # 1 byte every 0.5 s: never silent for 1 s, far below 100 B/s
        clock.now += 0.5
        budget.progress(trickle, 1)
    budget.reserve(10)
    assert len(seen) == 1 and budget.held_bytes == 10


def test_a_fast_sender_is_not_stale():
    clock = Clock()
    budget = UploadBudget(1000, stall_s=1.0, min_rate=100.0, clock=clock)
    fast = budget.reserve(1000)
    for _ in range(20):
        clock.now += 0.5
        budget.progress(fast, 60)  # 120 B/s
    with pytest.raises(TransportError):
        budget.reserve(10)


async def _parked(stop_after: int) -> AsyncIterator[bytes]:
    for frame in frames()[:stop_after]:
        yield frame
    await asyncio.sleep(3600)


async def _slow_complete() -> AsyncIterator[bytes]:
    for frame in frames():
        yield frame


def test_through_receive_kv_an_evicted_upload_ends_at_once_and_the_newcomer_waits_for_its_room():
    buffers = RecordingBuffers()
    budget = UploadBudget(3000, stall_s=0.3)  # room for one 2048-byte upload

    async def both():
        parked = asyncio.ensure_future(
            receive_kv(_parked(3), FrameAssembler(SPEC, buffers=buffers, budget=budget),
                       idle_timeout_s=30)
        )  # fmt: skip
        await asyncio.sleep(0.05)
        assert budget.uploads == 1
        started = asyncio.get_running_loop().time()
        received = await receive_kv(
            _slow_complete(), FrameAssembler(SPEC, buffers=buffers, budget=budget)
        )
        waited = asyncio.get_running_loop().time() - started
        with pytest.raises(TransportError) as info:
            await asyncio.wait_for(parked, 1.0)
        return received, waited, info.value

    received, waited, error = asyncio.run(both())
    assert received.cache.layout.total_bytes == 2048
    assert 0.2 < waited < 1.0  # waited until the parked upload went stale, not for its timeout
    assert status_code(error) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "upload evicted after" in error.message
    received.cache.release()
    assert budget.held_bytes == 0 and buffers.outstanding == {}


def test_an_upload_without_a_header_within_the_first_frame_timeout_is_deadline_exceeded():
    async def silent() -> AsyncIterator[bytes]:
        await asyncio.sleep(3600)
        yield b""

    assembler = FrameAssembler(SPEC, budget=UploadBudget(3000))
    with pytest.raises(TransportError) as info:
        asyncio.run(receive_kv(silent(), assembler, idle_timeout_s=30, first_frame_timeout_s=0.2))
    assert status_code(info.value) is grpc.StatusCode.DEADLINE_EXCEEDED
    assert info.value.message.startswith("no KV header within 0.2 s")


def test_a_reservation_for_a_given_upload_is_that_uploads():
    budget = UploadBudget(100)
    upload = Upload()
    assert budget.reserve(40, upload) is upload
    budget.release(upload)
    assert budget.held_bytes == 0


def test_a_newcomer_that_finds_no_room_in_time_is_busy_and_holds_nothing():
    buffers = RecordingBuffers()
    budget = UploadBudget(3000, stall_s=0.3, clock=Clock())  # the holder never goes stale
    budget.reserve(3000)
    assembler = FrameAssembler(SPEC, buffers=buffers, budget=budget)
    started = time.monotonic()
    with pytest.raises(TransportError) as info:
        asyncio.run(receive_kv(_slow_complete(), assembler, drain_seconds=1.0))
    waited = time.monotonic() - started
    assert status_code(info.value) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.message == (
        "uploads in flight already hold 3000 bytes; 2048 more would exceed the limit of 3000 "
        "bytes for all uploads in flight: retry later"
    )
    assert 0.5 <= waited < 3.0  # the stall time and its slack, then no longer
    assert budget.held_bytes == 3000 and budget.uploads == 1 and buffers.outstanding == {}
    with pytest.raises(TransportError) as again:
        assembler.feed(frames()[1])
    assert again.value is info.value  # the stream stays failed with that error


def test_waking_a_wait_that_has_not_started_does_nothing():
    _Waker().wake()
