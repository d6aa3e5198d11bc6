"""BufferPool: buffers given back are reused best-fit, and idle memory stays bounded."""

from __future__ import annotations

import platform
import time

import pytest

from transport import BufferPool, tune_malloc


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
