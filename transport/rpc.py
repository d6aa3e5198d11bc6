"""The Diffusion.Generate method with frames as raw bytes on both ends, and receiving a KV stream.

The generated stub and servicer would turn every chunk into a protobuf message (two more copies of
its data); these helpers register the same method path with pass-through (de)serialization of
the request frames, so `KVEncoder` output goes out as it is and `FrameAssembler` reads it in place.
"""

from __future__ import annotations

import asyncio
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
) -> ReceivedKV:
    """Feed a whole request stream to `assembler` and return the verified cache.

    Raises TransportError; on any exit other than success (cancellation too) the assembler's
    buffer is released. A sender that sends no frame for `idle_timeout_s` (None: wait forever)
    gets IDLE (DEADLINE_EXCEEDED), so a stalled upload cannot hold its buffer. After a fault, the rest of the stream is read and dropped before raising
    (at most the larger of the declared size and `max_bytes`, for at most `drain_seconds`): an
    asyncio client whose write fails because the call has already ended reports INTERNAL instead
    of our status (grpc/grpc#36066), so the status goes out once the client has stopped writing.
    """
    with assembler:
        stream = aiter(frames)
        try:
            while (frame := await _next_frame(stream, idle_timeout_s, assembler)) is not None:
                assembler.feed(frame)
            return assembler.finish()
        except TransportError as e:
            if e.fault is Fault.IDLE:
                raise  # nothing is coming to drain
            limit = max(assembler.max_bytes, assembler.declared_bytes) + MAX_CHUNK_SIZE
            await _drain(stream, limit, drain_seconds)
            raise


async def _next_frame(
    stream: AsyncIterator[bytes], timeout_s: float | None, assembler: FrameAssembler
) -> bytes | None:
    """The next frame, None at the end of the stream, or IDLE after `timeout_s` without one."""
    try:
        async with asyncio.timeout(timeout_s):
            return await anext(stream)
    except StopAsyncIteration:
        return None
    except TimeoutError:
        raise TransportError(
            Fault.IDLE,
            f"no KV frame for {timeout_s:g} s after {assembler.received_bytes} of "
            f"{assembler.declared_bytes} payload bytes: the upload was abandoned",
        ) from None


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
