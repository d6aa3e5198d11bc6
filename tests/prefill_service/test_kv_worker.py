"""The KV-prefill worker on its own: every job's batches are computed on its one long-lived
thread, in order, at most `depth` ahead of their reader; a cancelled job computes no further
batch and the worker goes on with the next; a failure reaches the reader as itself; the worker
waits its turn on the model; `close` joins it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from prefill_service.kv_worker import KVWorker
from prefill_service.model_turns import ModelTurns
from serving.errors import ServiceError, status_of

WAIT_S = 5.0


class Recorded:
    """A job's batches, one per "layer": records which layers were computed, on which thread,
    and whether the generator was closed (and on which thread). `gate(i)` runs before layer i."""

    def __init__(self, layers: int, gate=None, fail_at: int | None = None, error=None) -> None:
        self.layers = layers
        self.gate = gate
        self.fail_at = fail_at
        self.error = error or RuntimeError("device fell off the bus")
        self.computed: list[int] = []
        self.threads: set[int] = set()
        self.closed_on: int | None = None

    def __iter__(self) -> Iterator[list[bytes]]:
        try:
            for i in range(self.layers):
                if self.gate is not None:
                    self.gate(i)
                self.threads.add(threading.get_ident())
                if i == self.fail_at:
                    raise self.error
                self.computed.append(i)
                yield [bytes([i]), bytes([i, i])]
        finally:
            self.closed_on = threading.get_ident()


def wait_until(predicate, timeout: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.fixture
def worker() -> Iterator[KVWorker]:
    worker = KVWorker(depth=2)
    yield worker
    worker.close()


def test_jobs_are_computed_in_order_on_the_one_worker_thread(worker):
    first, second = Recorded(4), Recorded(3)
    got = [list(worker.submit(iter(first)).batches()), list(worker.submit(iter(second)).batches())]
    assert got[0] == [[bytes([i]), bytes([i, i])] for i in range(4)]
    assert got[1] == [[bytes([i]), bytes([i, i])] for i in range(3)]
    assert first.threads == second.threads == {worker.thread.ident}
    assert worker.thread.ident != threading.get_ident()
    assert first.closed_on == second.closed_on == worker.thread.ident


def test_a_job_runs_at_most_depth_batches_ahead_of_its_reader(worker):
    job_source = Recorded(10)
    job = worker.submit(iter(job_source))
    assert wait_until(lambda: len(job_source.computed) == 2)  # depth 2, nothing taken yet
    time.sleep(0.2)
    assert job_source.computed == [0, 1]
    batches = job.batches()
    next(batches)
    assert wait_until(lambda: len(job_source.computed) == 3)  # one taken: one more computed
    time.sleep(0.2)
    assert job_source.computed == [0, 1, 2]
    assert len(list(batches)) == 9 and job_source.computed == list(range(10))


def test_a_reader_that_takes_nothing_does_not_hold_up_the_next_job(worker):
    stalled_source = Recorded(10)
    stalled = worker.submit(iter(stalled_source))
    other = Recorded(5)
    assert len(list(worker.submit(iter(other)).batches())) == 5
    assert stalled_source.computed == [0, 1]
    stalled.cancel()


def test_a_cancelled_job_computes_no_further_layer_and_the_worker_serves_the_next(worker):
    in_layer_1, go_on = threading.Event(), threading.Event()

    def gate(i: int) -> None:
        if i == 1:
            in_layer_1.set()
            go_on.wait(WAIT_S)

    cancelled_source = Recorded(8, gate)
    job = worker.submit(iter(cancelled_source))
    batches = job.batches()
    assert next(batches) == [b"\x00", b"\x00\x00"]
    assert in_layer_1.wait(WAIT_S)
    job.cancel()  # while layer 1 is being computed: it is the last
    go_on.set()
    assert wait_until(lambda: cancelled_source.closed_on is not None)
    assert cancelled_source.computed == [0, 1]
    assert cancelled_source.closed_on == worker.thread.ident
    assert len(list(batches)) <= 1  # the layer in progress at most, then the end; no error

    following = Recorded(3)
    assert len(list(worker.submit(iter(following)).batches())) == 3
    assert cancelled_source.computed == [0, 1]


def test_a_reader_stops_waiting_once_its_call_has_ended(worker):
    slow = Recorded(3, gate=lambda i: time.sleep(0.5) if i == 1 else None)
    job = worker.submit(iter(slow))
    read = []
    started = time.monotonic()
    for batch in job.batches(keep_going=lambda: not read, poll_s=0.05):  # ends after one
        read.append(batch)
    assert time.monotonic() - started < 0.4  # did not wait for layer 1
    assert read == [[b"\x00", b"\x00\x00"]]
    job.cancel()
    assert wait_until(lambda: slow.closed_on is not None)
    assert slow.computed == [0, 1]


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (RuntimeError("device fell off the bus"), grpc.StatusCode.INTERNAL),
        (
            ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "out of memory"),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
    ],
    ids=["runtime", "service-error"],
)
def test_a_failure_in_the_computation_reaches_the_reader_as_itself(worker, error, code):
    failing = Recorded(5, fail_at=2, error=error)
    read = []
    with pytest.raises(type(error)) as info:
        for batch in worker.submit(iter(failing)).batches():
            read.append(batch)
    assert info.value is error
    assert status_of(info.value)[0] is code
    assert len(read) == 2 and failing.computed == [0, 1]
    assert len(list(worker.submit(iter(Recorded(2))).batches())) == 2  # the worker goes on


def test_close_joins_the_worker_and_ends_its_jobs_with_unavailable():
    worker = KVWorker(depth=1)
    unread_source = Recorded(10)
    job = worker.submit(iter(unread_source))
    assert wait_until(lambda: unread_source.computed == [0])
    worker.close()
    assert not worker.thread.is_alive()
    assert unread_source.closed_on == worker.thread.ident  # closed on the worker, before it ended
    batches = job.batches()
    assert next(batches) == [b"\x00", b"\x00\x00"]  # what was ready is still read
    with pytest.raises(ServiceError) as info:
        next(batches)
    assert info.value.code is grpc.StatusCode.UNAVAILABLE
    with pytest.raises(ServiceError) as info:
        worker.submit(iter(Recorded(1)))
    assert info.value.code is grpc.StatusCode.UNAVAILABLE


def test_the_worker_computes_only_in_its_turn_on_the_model():
    turns = ModelTurns()
    worker = KVWorker(turns)
    held, release = threading.Event(), threading.Event()

    def other_user() -> None:  # e.g. the decode thread in the middle of a step
        with turns:
            held.set()
            release.wait(WAIT_S)

    user = threading.Thread(target=other_user)
    user.start()
    try:
        assert held.wait(WAIT_S)
        source = Recorded(2)
        job = worker.submit(iter(source))
        time.sleep(0.2)
        assert source.computed == []
        release.set()
        assert len(list(job.batches())) == 2
    finally:
        release.set()
        user.join(WAIT_S)
        worker.close()


def test_turns_are_taken_first_come_first_served_one_at_a_time():
    turns = ModelTurns()
    order: list[int] = []
    inside = []
    first_in, release = threading.Event(), threading.Event()

    def user(i: int) -> None:
        with turns:
            inside.append(i)
            assert len(inside) == 1  # nobody else holds a turn
            if i == 0:
                first_in.set()
                release.wait(WAIT_S)
            order.append(i)
            inside.remove(i)

    threads = [threading.Thread(target=user, args=(0,))]
    threads[0].start()
    assert first_in.wait(WAIT_S)
    for i in range(1, 5):  # queue up in a known order behind user 0
        t = threading.Thread(target=user, args=(i,))
        t.start()
        threads.append(t)
        assert wait_until(lambda i=i: turns._next_ticket == i + 1)
    release.set()
    for t in threads:
        t.join(WAIT_S)
    assert order == [0, 1, 2, 3, 4]
