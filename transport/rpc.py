"""The Diffusion.Generate method with frames as raw bytes on both ends, and receiving a KV stream.

The generated stub and servicer would turn every chunk into a protobuf message (two more copies of
its data); these helpers register the same method path with pass-through (de)serialization of
the request frames, so `KVEncoder` output goes out as it is and `FrameAssembler` reads it in place.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import NoReturn

import grpc

from protos import DIFFUSION_SERVICE, GenerateEvent
from transport.assembler import FrameAssembler, ReceivedKV
from transport.errors import Fault, TransportError, status_code
from transport.wire import MAX_CHUNK_SIZE

DIFFUSION_GENERATE = f"/{DIFFUSION_SERVICE}/Generate"

GenerateBehavior = Callable[
    [AsyncIterator[bytes], grpc.aio.ServicerContext], AsyncIterator[GenerateEvent]
]


def diffusion_generate(
    channel: grpc.Channel | grpc.aio.Channel,
) -> grpc.StreamStreamMultiCallable | grpc.aio.StreamStreamMultiCallable:
    """Client side of Diffusion.Generate taking serialized frames (bytes), yielding events."""
    return channel.stream_stream(
        DIFFUSION_GENERATE,
        request_serializer=None,
        response_deserializer=GenerateEvent.FromString,
    )


def diffusion_handler(generate: GenerateBehavior) -> grpc.GenericRpcHandler:
    """Server side of Diffusion.Generate: `generate(frames, context)` gets each frame as bytes.

    Register with `server.add_generic_rpc_handlers((diffusion_handler(fn),))`.
    """
    method = grpc.stream_stream_rpc_method_handler(
        generate,
        request_deserializer=None,
        response_serializer=GenerateEvent.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(DIFFUSION_SERVICE, {"Generate": method})


async def receive_kv(
    frames: AsyncIterable[bytes],
    assembler: FrameAssembler,
    *,
    drain_seconds: float = 10.0,
    idle_timeout_s: float | None = None,
    first_frame_timeout_s: float | None = None,
) -> ReceivedKV:
    """Feed a whole request stream to `assembler` and return the verified cache.

    Raises TransportError; on any exit other than success (cancellation too) the assembler's
    buffer is released. A sender that sends no frame for `idle_timeout_s` (None: wait forever),
    or no header within `first_frame_timeout_s`, gets IDLE (DEADLINE_EXCEEDED), so a stalled
    upload cannot hold its buffer. With an upload budget, a header that does not fit waits up to
    the budget's `stall_s` for room, and a stale upload may be evicted to make room for another
    (`transport.admission`): it ends at once with EVICTED (RESOURCE_EXHAUSTED).

    After a fault, the rest of the stream is read and dropped before raising (at most the larger
    of the declared size and `max_bytes`, for at most `drain_seconds`): an asyncio client whose
    write fails because the call has already ended reports INTERNAL instead of our status
    (grpc/grpc#36066), so the status goes out once the client has stopped writing.
    """
    waker = _Waker()

    def evict(error: TransportError) -> None:  # on the event loop, from another upload's feed
        assembler.evict(error)
        waker.wake()

    assembler.upload.evict = evict
    assembler.may_wait_for_room = assembler.budget is not None
    with assembler:
        stream = aiter(frames)
        try:
            timeout_s = _shorter(first_frame_timeout_s, idle_timeout_s)
            while (frame := await _next_frame(stream, timeout_s, assembler, waker)) is not None:
                assembler.feed(frame)
                if assembler.waiting_for_room:
                    await _wait_for_room(assembler)
                timeout_s = idle_timeout_s
            return assembler.finish()
        except TransportError as e:
            if e.fault in (Fault.IDLE, Fault.EVICTED):
                raise  # nothing is coming to drain
            limit = max(assembler.max_bytes, assembler.declared_bytes) + MAX_CHUNK_SIZE
            await _drain(stream, limit, drain_seconds)
            raise


ROOM_POLL_S = 0.05
ROOM_WAIT_SLACK_S = 0.25  # past the stall time, so a holder silent since just before is stale


async def _wait_for_room(assembler: FrameAssembler) -> None:
    """Wait up to the budget's `stall_s` for the header's reservation (holders that go stale in
    the meantime are evicted); raise BUSY when none came."""
    assert assembler.budget is not None
    end = time.monotonic() + assembler.budget.stall_s + ROOM_WAIT_SLACK_S
    while not assembler.try_admit():
        if time.monotonic() >= end:
            raise assembler.refuse_admission()
        await asyncio.sleep(ROOM_POLL_S)


class _Waker:
    """Ends the wait for the next frame early (an eviction), through the wait's timeout."""

    def __init__(self) -> None:
        self.timeout: asyncio.Timeout | None = None

    def wake(self) -> None:
        if self.timeout is not None and not self.timeout.expired():
            self.timeout.reschedule(asyncio.get_running_loop().time())


def _shorter(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


async def _next_frame(
    stream: AsyncIterator[bytes],
    timeout_s: float | None,
    assembler: FrameAssembler,
    waker: _Waker,
) -> bytes | None:
    """The next frame, None at the end of the stream, IDLE after `timeout_s` without one, or the
    eviction that ended the wait."""
    try:
        async with asyncio.timeout(timeout_s) as waker.timeout:
            return await anext(stream)
    except StopAsyncIteration:
        return None
    except TimeoutError:
        failure = assembler.failure
        if failure is not None and failure.fault is Fault.EVICTED:
            raise failure from None
        if assembler.declared_bytes == 0:
            raise TransportError(
                Fault.IDLE,
                f"no KV header within {timeout_s:g} s of the call's start: the upload was "
                "abandoned",
            ) from None
        raise TransportError(
            Fault.IDLE,
            f"no KV frame for {timeout_s:g} s after {assembler.received_bytes} of "
            f"{assembler.declared_bytes} payload bytes: the upload was abandoned",
        ) from None
    finally:
        waker.timeout = None


async def _drain(stream: AsyncIterator[bytes], max_bytes: int, seconds: float) -> None:
    dropped = 0
    try:
        async with asyncio.timeout(seconds):
            async for frame in stream:
                dropped += len(frame)
                if dropped > max_bytes:
                    return
    except TimeoutError:
        return


async def abort(context: grpc.aio.ServicerContext, error: TransportError) -> NoReturn:
    """End the call with the status that `error` maps to and its message."""
    await context.abort(status_code(error), error.message)
    raise AssertionError("unreachable: context.abort raises")
