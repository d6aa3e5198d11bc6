"""The KV-prefill worker: one long-lived thread, started with the service and joined at its stop,
that runs every request's KV computation (the layers, their copy to the host and their encoding
into frames); on a GPU it runs on a CUDA stream of its own. No request thread runs model work.

A request hands its lazy frame batches (`prefill.request_frames`) over as a `KVJob`; the worker
computes the job's batches one at a time and leaves each in the job's bounded buffer, from which
the gRPC request iterator (`relay.FrameFeed`) takes it. So layer l+1 is computed while layer l is
on the wire, and a downstream that does not take its frames (HTTP/2 flow control) stops its job
`depth` batches ahead, while the worker goes on with the other jobs: the worker always computes
the next batch of the oldest job that has room. A cancelled job is closed before its next layer
is computed; a failure of the computation is handed to the job's reader, which raises it.

The worker shares the model with the text decode thread by taking a `ModelTurns` turn for each
batch it computes (`prefill_service.model_turns` says why and how).

Nothing waits without an end: the worker wakes at least every `IDLE_WAIT_S` and stops once
closed, a reader waits at most `poll_s` at a time and then asks its caller whether to go on, and
a turn on the model ends with the one unit of work that holds it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext

import grpc
import torch

from prefill_service.model_turns import ModelTurns
from serving.errors import ServiceError

log = logging.getLogger(__name__)

DEFAULT_DEPTH = 2  # batches a job may hold that its reader has not taken
IDLE_WAIT_S = 1.0  # the worker's longest wait without a wake-up
READ_POLL_S = 0.5  # a reader's longest wait before it asks whether to go on
JOIN_TIMEOUT_S = 10.0
SHUTTING_DOWN = "the prefill service is shutting down"


class _End:
    """The last item of a job that ran to its end."""


_END = _End()


class KVJob:
    """One request's frame batches, computed on the worker. Read them with `batches()` (on one
    thread); `cancel()` from anywhere stops the computation before its next batch."""

    def __init__(self, worker: KVWorker, batches: Iterator[list[bytes]]) -> None:
        self._worker = worker
        self._source = batches
        self._ready: deque[list[bytes] | BaseException | _End] = deque()
        self._cancelled = False
        self._finished = False  # the worker will add nothing more
        self._complete = False  # the reader has taken the last batch of a job that ran to its end

    def cancel(self) -> None:
        """Compute no further batch (the one being computed, if any, is the last)."""
        with self._worker._changed:
            self._cancelled = True
            self._worker._changed.notify_all()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def complete(self) -> bool:
        """Whether `batches()` has given every batch of a job that ran to its end."""
        return self._complete

    def batches(
        self, keep_going: Callable[[], bool] = lambda: True, poll_s: float = READ_POLL_S
    ) -> Iterator[list[bytes]]:
        """The batches as the worker computes them. Raises the computation's exception, or a
        ServiceError (UNAVAILABLE) when the worker stopped first; ends early once the job is
        cancelled or `keep_going()`, asked every `poll_s` while nothing arrives, says no."""
        while True:
            item = self._take(poll_s)
            if item is None:
                if self._cancelled or not keep_going():
                    return
                continue
            if isinstance(item, _End):
                self._complete = True
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _take(self, timeout: float) -> list[bytes] | BaseException | _End | None:
        """The next item, or None when there is none within `timeout` or the job is cancelled."""
        worker = self._worker
        deadline = time.monotonic() + timeout
        with worker._changed:
            while not self._ready:
                if self._cancelled:
                    return None
                if self._finished or worker._closed:
                    return ServiceError(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
                if not worker.thread.is_alive():
                    return RuntimeError("the KV prefill worker thread has ended")
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                worker._changed.wait(left)
            item = self._ready.popleft()
            worker._changed.notify_all()  # room for the next batch
            return item


class KVWorker:
    """The thread that computes every job. `depth`: the batches a job may hold that its reader
    has not taken yet (at least 1). `turns`: shared with the other users of the model."""

    def __init__(
        self,
        turns: ModelTurns | None = None,
        *,
        depth: int = DEFAULT_DEPTH,
        name: str = "kv-prefill",
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.turns = turns or ModelTurns()
        self.depth = depth
        self._changed = threading.Condition()
        self._jobs: list[KVJob] = []  # oldest first
        self._closed = False
        self._stream: torch.cuda.Stream | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    @property
    def running(self) -> bool:
        return not self._closed and self.thread.is_alive()

    @property
    def jobs(self) -> int:
        """Jobs submitted and not yet over (run to their end, failed, or cancelled and closed
        is over; a cancelled one is dropped before its next batch)."""
        with self._changed:
            return len(self._jobs)

    def submit(self, batches: Iterator[list[bytes]]) -> KVJob:
        """Queue the computation of `batches` (a lazy iterator: the worker calls its `next` and,
        at the end or on a cancel, its `close`). ServiceError UNAVAILABLE once closed."""
        job = KVJob(self, batches)
        with self._changed:
            if not self.running:
                raise ServiceError(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
            self._jobs.append(job)
            self._changed.notify_all()
        return job

    def close(self, timeout: float = JOIN_TIMEOUT_S) -> None:
        """Stop after the batch being computed: every job left is closed, its reader gets
        UNAVAILABLE. Joins the thread (at most `timeout`)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout)

    def _run(self) -> None:
        while True:
            job, dropped = self._next_job()
            for gone in dropped:
                self._close_source(gone)
            if job is not None:
                self._step(job)
            elif self._closed:
                return

    def _next_job(self) -> tuple[KVJob | None, list[KVJob]]:
        """The oldest job with room for a batch, and the jobs to close (cancelled ones, and all
        of them once the worker is closed). Waits while there is neither."""
        with self._changed:
            while True:
                dropped = [j for j in self._jobs if j._cancelled or self._closed]
                if dropped:
                    self._jobs = [j for j in self._jobs if j not in dropped]
                    for j in dropped:
                        j._finished = True
                    self._changed.notify_all()
                    return None, dropped
                if self._closed:
                    return None, []
                for job in self._jobs:
                    if len(job._ready) < self.depth:
                        return job, []
                self._changed.wait(IDLE_WAIT_S)

    def _step(self, job: KVJob) -> None:
        """Compute `job`'s next batch, in a turn on the model and on the worker's stream."""
        item: list[bytes] | BaseException | _End
        try:
            with self.turns, self._on_stream():
                item = next(job._source)
        except StopIteration:
            item = _END
        except Exception as e:  # noqa: BLE001 - the job's reader raises it
            item = e
        finished = not isinstance(item, list)
        with self._changed:
            job._ready.append(item)
            if finished:
                job._finished = True
                self._jobs.remove(job)
            self._changed.notify_all()

    def _close_source(self, job: KVJob) -> None:
        """Close a job that will not run to its end (its generators' cleanup may touch the GPU)."""
        close = getattr(job._source, "close", None)
        if close is None:
            return
        try:
            with self.turns, self._on_stream():
                close()
        except Exception:  # noqa: BLE001 - the job is over either way
            log.exception("closing a cancelled KV job failed")

    def _on_stream(self) -> AbstractContextManager:
        """The worker's own CUDA stream (made once CUDA is in use in this process), or nothing."""
        if self._stream is None and torch.cuda.is_available() and torch.cuda.is_initialized():
            stream = torch.cuda.Stream()
            # Whatever was queued on the default stream (the weights' upload) comes first.
            stream.wait_stream(torch.cuda.default_stream())
            self._stream = stream
        if self._stream is None:
            return nullcontext()
        return torch.cuda.stream(self._stream)
