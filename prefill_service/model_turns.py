"""Turns on the model: the prefill service's two GPU users (the KV-prefill worker,
`prefill_service.kv_worker`, and the text decode thread, `prefill_service.decode_scheduler`) run
model work one unit at a time, first come first served.

A unit is short and bounded: one KV layer with its copy to the host, one decode step, one decode
join. Taking turns keeps one thread's CUDA calls out of the other's CUDA graph captures (a
capture in PyTorch's default "global" mode fails when another thread calls the CUDA runtime
meanwhile), and the first-come order keeps a busy decode batch from starving a prefill and the
other way round. The model itself holds no per-call state, so this is the only rule its two
users need.
"""

from __future__ import annotations

import threading
from types import TracebackType


class ModelTurns:
    """A first-come-first-served lock: `with turns:` around one unit of model work. A waiter
    waits only for the units queued before it, each of which ends."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._next_ticket = 0
        self._now_serving = 0
        self._abandoned: set[int] = set()  # tickets whose waiter was interrupted

    def __enter__(self) -> None:
        with self._changed:
            ticket = self._next_ticket
            self._next_ticket += 1
            try:
                while ticket != self._now_serving:
                    self._changed.wait()
            except BaseException:
                # Interrupted while waiting: give the turn up when it comes, so later tickets pass.
                self._abandon(ticket)
                raise

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        with self._changed:
            self._advance()

    def _advance(self) -> None:
        self._now_serving += 1
        while self._now_serving in self._abandoned:
            self._abandoned.discard(self._now_serving)
            self._now_serving += 1
        self._changed.notify_all()

    def _abandon(self, ticket: int) -> None:
        if ticket == self._now_serving:
            self._advance()
        else:
            self._abandoned.add(ticket)
