"""BufferPool: buffers given back are reused best-fit, and idle memory stays bounded."""

from __future__ import annotations

import platform
import time

import pytest

from transport import BufferPool, TransportError, UploadBudget, tune_malloc


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
