"""Stand-ins for calling a servicer in process: the caller's gRPC context, an engine that queues
jobs and runs none, and a request stream from a list of frames."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import grpc


class Aborted(Exception):
    """What `CallerContext.abort` raises, as grpc.aio's abort does."""


class CallerContext:
    """The caller's side of an aio servicer call: no deadline; `abort` records its status."""

    def __init__(self) -> None:
        self.status: tuple[grpc.StatusCode, str] | None = None

    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        self.status = (code, message)
        raise Aborted


class QueueOnlyEngine:
    """Takes jobs and runs none; remembers them so that a test can look at them."""

    def __init__(self) -> None:
        self.handles = []

    def submit(self, handle) -> int:
        self.handles.append(handle)
        return 0


async def stream_of(items: Iterable) -> AsyncIterator:
    for item in items:
        yield item
