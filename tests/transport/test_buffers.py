"""BufferPool: buffers given back are reused best-fit, and idle memory stays bounded."""

from __future__ import annotations

import platform
import time
from types import SimpleNamespace

import pytest
import torch

from transport import BufferPool, TransportError, UploadBudget, buffers, tune_malloc


def test_a_buffer_given_back_is_reused_for_a_smaller_or_equal_request():
    pool = BufferPool()
    a = pool.take(1000)
    pointer = a.data_ptr()
    pool.give_back(a)
    b = pool.take(600)
    assert b.data_ptr() == pointer and b.numel() == 600


def test_best_fit_takes_the_smallest_buffer_that_fits():
    pool = BufferPool()
    big, small = pool.take(10_000), pool.take(2_000)
    pointers = big.data_ptr(), small.data_ptr()
    pool.give_back(big)
    pool.give_back(small)
    assert pool.take(1_500).data_ptr() == pointers[1]
    assert pool.take(1_500).data_ptr() == pointers[0]


def test_a_larger_request_gets_a_new_buffer():
    pool = BufferPool()
    a = pool.take(100)
    pool.give_back(a)
    assert pool.take(200).numel() == 200
    assert pool.idle_bytes == 100


def test_idle_bytes_stay_under_the_cap_oldest_dropped_first():
    pool = BufferPool(max_idle_bytes=250)
    buffers = [pool.take(100) for _ in range(3)]
    for b in buffers:
        pool.give_back(b)
    assert pool.idle_bytes == 200


def test_giving_back_twice_or_a_foreign_tensor_is_harmless():
    pool = BufferPool()
    a = pool.take(64)
    pool.give_back(a)
    pool.give_back(a)
    pool.give_back(BufferPool().take(64))
    assert pool.idle_bytes == 64


def test_zero_byte_buffers_work():
    pool = BufferPool()
    a = pool.take(0)
    assert a.numel() == 0
    pool.give_back(a)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tune_malloc_succeeds_on_glibc():
    assert tune_malloc() is True


def test_once_idle_for_a_while_the_pool_keeps_only_its_bound_largest_dropped_first():
    pool = BufferPool(max_idle_bytes=10_000, keep_idle_bytes=1_500, release_after_s=0.1)
    lent = [pool.take(n) for n in (1000, 3000, 500)]
    for buffer in lent:
        pool.give_back(buffer)
    assert pool.idle_bytes == 4500  # kept while the pool may still be busy
    deadline = time.monotonic() + 5
    while pool.idle_bytes > 1500 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pool.idle_bytes == 1500  # the 3000-byte buffer went first
    assert pool.take(900).numel() == 900 and pool.lent_bytes == 1000


def test_a_pool_in_use_gives_nothing_back():
    pool = BufferPool(max_idle_bytes=10_000, keep_idle_bytes=0, release_after_s=0.1)
    pool.give_back(pool.take(1000))
    held = pool.take(2000)  # in use again before the quiet time ran out
    time.sleep(0.3)
    assert pool.idle_bytes == 1000 and pool.lent_bytes == 2000
    pool.give_back(held)
    assert pool.release_idle() == 3000 and pool.idle_bytes == 0


def test_idle_bytes_may_reach_the_cap_exactly_and_the_oldest_go_first():
    pool = BufferPool(max_idle_bytes=200)
    for b in [pool.take(100), pool.take(100)]:
        pool.give_back(b)
    assert pool.idle_bytes == 200
    pool = BufferPool(max_idle_bytes=120)
    for b in [pool.take(100), pool.take(60), pool.take(50)]:
        pool.give_back(b)
    assert pool.idle_bytes == 110  # the 100-byte buffer, given back first, was dropped


def test_a_zero_byte_request_holds_a_one_byte_buffer():
    pool = BufferPool()
    pool.give_back(pool.take(0))
    assert pool.idle_bytes == 1


def test_a_pool_remembers_whether_it_pins_memory():
    assert BufferPool(pin_memory=True).pin_memory is True
    assert BufferPool().pin_memory is False


def test_a_single_buffer_given_back_is_released_once_the_pool_is_quiet():
    pool = BufferPool(max_idle_bytes=10_000, keep_idle_bytes=0, release_after_s=0.05)
    pool.give_back(pool.take(3000))
    deadline = time.monotonic() + 5
    while pool.idle_bytes and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pool.idle_bytes == 0


def test_release_idle_keeps_what_it_is_told_to_keep():
    pool = BufferPool()
    for b in [pool.take(100), pool.take(300)]:
        pool.give_back(b)
    assert pool.release_idle(keep_bytes=100) == 300 and pool.idle_bytes == 100
    assert pool.release_idle(keep_bytes=0) == 100 and pool.idle_bytes == 0


def test_an_upload_budget_takes_a_reservation_of_exactly_what_is_left():
    budget = UploadBudget(100)
    budget.reserve(60)
    budget.reserve(40)
    assert budget.held_bytes == 100
    with pytest.raises(TransportError, match="already hold 100 bytes; 1 more"):
        budget.reserve(1)


def test_a_release_timer_from_before_a_take_drops_nothing():
    """The timer of a quiet period that a take interrupted may already be running when the take's
    buffer comes back: it finds the pool used since and leaves it alone."""
    pool = BufferPool(max_idle_bytes=10_000, keep_idle_bytes=0, release_after_s=60)
    pool.give_back(pool.take(1000))
    stale = pool._timer
    stale.cancel()
    pool.give_back(pool.take(1000))  # used again: a new quiet period begins
    assert pool._timer is not stale and pool._timer.daemon is True  # never holds up the exit
    pool._timer.cancel()
    stale.function()  # the interrupted period's release runs late
    assert pool.idle_bytes == 1000
    pool._timer.function()  # the current one releases
    assert pool.idle_bytes == 0


def test_the_pool_allocates_pinned_memory_when_asked(monkeypatch):
    asked = []

    def empty(nbytes, *, dtype, pin_memory):
        asked.append((nbytes, dtype, pin_memory))
        return torch.zeros(nbytes, dtype=dtype)

    monkeypatch.setattr(buffers, "torch", SimpleNamespace(empty=empty, uint8=torch.uint8))
    BufferPool(pin_memory=True).take(10)
    BufferPool().take(0)
    assert asked == [(10, torch.uint8, True), (1, torch.uint8, False)]


class FakeLibc:
    def __init__(self, accepted: int = 1) -> None:
        self.calls = []
        self.accepted = accepted

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return self.accepted


@pytest.mark.parametrize("found", ["libc.so.6", "libc-other.so", None])
def test_tune_malloc_sets_the_three_thresholds_through_the_c_librarys_mallopt(monkeypatch, found):
    libc, opened, looked_up = FakeLibc(), [], []

    def find_library(name):
        looked_up.append(name)
        return found

    monkeypatch.setattr(buffers.ctypes.util, "find_library", find_library)
    monkeypatch.setattr(buffers.ctypes, "CDLL", lambda name: opened.append(name) or libc)
    assert tune_malloc(mmap_threshold=1, trim_threshold=2, top_pad=3) is True
    assert looked_up == ["c"] and opened == [found or "libc.so.6"]
    assert libc.calls == [
        (-3, 1),
        (-1, 2),
        (-2, 3),
    ]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD
    monkeypatch.setattr(buffers.ctypes, "CDLL", lambda name: FakeLibc(accepted=0))
    assert tune_malloc() is False  # mallopt refused a setting


@pytest.mark.parametrize("error", [OSError("no libc"), AttributeError("no mallopt")])
def test_tune_malloc_without_mallopt_changes_nothing_and_says_so(monkeypatch, error):
    def cdll(name):
        raise error

    monkeypatch.setattr(buffers.ctypes, "CDLL", cdll)
    assert tune_malloc() is False


def test_fresh_buffers_allocate_pinned_memory_when_asked(monkeypatch):
    asked = []

    def empty(nbytes, *, dtype, pin_memory):
        asked.append((nbytes, dtype, pin_memory))
        return torch.zeros(nbytes, dtype=dtype)

    monkeypatch.setattr(buffers, "torch", SimpleNamespace(empty=empty, uint8=torch.uint8))
    buffers.FreshBuffers(pin_memory=True).take(10)
    buffers.FreshBuffers().take(3)
    assert asked == [(10, torch.uint8, True), (3, torch.uint8, False)]
