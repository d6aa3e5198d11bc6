"""The codec through a real grpc.aio server on 127.0.0.1: the cache arrives intact, faults end
the call with their status, and standard protobuf clients are understood too."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest
import torch

from protos import Accepted, DiffusionFrame, DiffusionStub, GenerateEvent
from transport import (
    FrameAssembler,
    TransportError,
    abort,
    channel_options,
    diffusion_generate,
    diffusion_handler,
    encode_kv,
    receive_kv,
    server_options,
)

from .factory import FINGERPRINT, RecordingBuffers, assert_same_cache, make_contexts, spec_for

CONTEXTS = make_contexts([40, 0, 25], dtype=torch.bfloat16, layers=4, heads=4, head_dim=16)
SPEC = spec_for(CONTEXTS)


class Receiver:
    """A minimal Diffusion servicer: assemble, remember the cache, answer Accepted."""

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.buffers = RecordingBuffers()
        self.max_bytes = max_bytes
        self.received = []

    async def generate(self, frames, context):
        assembler = FrameAssembler(SPEC, max_bytes=self.max_bytes, buffers=self.buffers)
        try:
            kv = await receive_kv(frames, assembler)
        except TransportError as e:
            await abort(context, e)
        self.received.append(kv)
        yield GenerateEvent(accepted=Accepted(request_id=kv.request_id))


@contextlib.asynccontextmanager
async def serving(receiver: Receiver):
    server = grpc.aio.server(options=server_options())
    server.add_generic_rpc_handlers((diffusion_handler(receiver.generate),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=channel_options()) as ch:
            yield ch
    finally:
        await server.stop(None)


def frames(chunk_size: int = 4096) -> list[bytes]:
    return list(
        encode_kv(CONTEXTS, request_id="e2e", fingerprint=FINGERPRINT, chunk_size=chunk_size)
    )


def test_cache_streamed_over_grpc_arrives_exactly():
    receiver = Receiver()

    async def main():
        async with serving(receiver) as ch:
            return [e async for e in diffusion_generate(ch)(iter(frames()))]

    events = asyncio.run(main())
    assert [e.accepted.request_id for e in events] == ["e2e"]
    assert_same_cache(CONTEXTS, receiver.received[0].cache.contexts)


def test_generated_stub_sending_protobuf_messages_is_understood():
    receiver = Receiver()
    messages = [DiffusionFrame.FromString(f) for f in frames(chunk_size=1000)]

    async def main():
        async with serving(receiver) as ch:
            return [e async for e in DiffusionStub(ch).Generate(iter(messages))]

    assert asyncio.run(main())[0].accepted.request_id == "e2e"
    assert_same_cache(CONTEXTS, receiver.received[0].cache.contexts)


def corrupt(fs: list[bytes]) -> list[bytes]:
    fs[5] = fs[5][:-1] + bytes([fs[5][-1] ^ 0xFF])  # last data byte of a chunk
    return fs


@pytest.mark.parametrize(
    ("tamper", "max_bytes", "code", "message"),
    [
        (corrupt, 1 << 30, grpc.StatusCode.DATA_LOSS, "CRC mismatch"),
        (lambda fs: fs[:-1], 1 << 30, grpc.StatusCode.INVALID_ARGUMENT, "early end"),
        (
            lambda fs: fs,
            1000,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "exceeds this receiver's limit of 1000",
        ),
    ],
    ids=["corrupt", "early-end", "too-large"],
)
def test_a_bad_stream_ends_the_call_with_its_status(tamper, max_bytes, code, message):
    receiver = Receiver(max_bytes=max_bytes)

    async def main():
        async with serving(receiver) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                [e async for e in diffusion_generate(ch)(iter(tamper(frames())))]
            return caught.value

    error = asyncio.run(main())
    assert error.code() == code
    assert message in error.details()
    assert receiver.buffers.outstanding == {}


def test_a_client_that_cancels_mid_stream_leaves_no_buffer_on_the_server():
    receiver = Receiver()
    all_frames = frames(chunk_size=512)

    async def main():
        gate = asyncio.Event()

        async def slow_frames():
            for frame in all_frames[:10]:
                yield frame
            gate.set()
            await asyncio.sleep(30)  # never finishes: the client cancels first

        async with serving(receiver) as ch:
            call = diffusion_generate(ch)(slow_frames())
            await gate.wait()
            await asyncio.sleep(0.2)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call.read()
            for _ in range(50):  # the server notices the cancellation asynchronously
                if receiver.buffers.requested and not receiver.buffers.outstanding:
                    break
                await asyncio.sleep(0.05)

    asyncio.run(main())
    assert receiver.buffers.requested, "the server never allocated: the test proves nothing"
    assert receiver.buffers.outstanding == {}


def test_after_a_fault_an_endless_stream_is_drained_only_for_a_bounded_time():
    async def endless():
        yield b"\x0f"  # not a frame
        while True:
            await asyncio.sleep(0.01)
            yield b"x"

    async def main():
        start = time.perf_counter()
        with pytest.raises(TransportError, match="malformed frame"):
            await receive_kv(endless(), FrameAssembler(SPEC), drain_seconds=0.3)
        return time.perf_counter() - start

    assert 0.25 < asyncio.run(main()) < 2.0


def test_after_a_fault_draining_stops_past_the_byte_bound():
    drained = []

    async def flood():
        yield b"\x0f"
        for _ in range(100_000):
            drained.append(1)
            yield b"x" * (1 << 20)

    async def main():
        with pytest.raises(TransportError):
            await receive_kv(flood(), FrameAssembler(SPEC, max_bytes=4 << 20), drain_seconds=60)

    asyncio.run(main())
    assert len(drained) <= (4 << 20) // (1 << 20) + 16 + 1  # max_bytes + one max chunk
