"""Every fault class, made by tampering with a real frame stream: the right status, the right
message, and no buffer left behind."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
import torch

from bagel.network.kv import ContextKV
from protos import DiffusionFrame, kv_pb2
from transport import (
    Fault,
    FrameAssembler,
    KVSpec,
    TransportError,
    UploadBudget,
    check_finite,
    encode_kv,
    receive_kv,
    status_code,
)
from transport.crc import crc32c
from transport.wire import parse_frame

from .factory import FINGERPRINT, RecordingBuffers, make_contexts, raw, spec_for

CHUNK = 64
# fp32, 2 layers, 2 heads x 8 dims: a cond K or V of 5 tokens is 320 bytes = 5 chunks of 64.
CONTEXTS = make_contexts([5, 0, 3], dtype=torch.float32, layers=2)
SPEC = spec_for(CONTEXTS)
PAYLOAD = b"".join(
    raw(t) for c in CONTEXTS.values() for pair in zip(c.keys, c.values, strict=True) for t in pair
)
Frames = list[bytes]


def frames() -> Frames:
    return list(encode_kv(CONTEXTS, request_id="t", fingerprint=FINGERPRINT, chunk_size=CHUNK))


def edit(frame: bytes, change: Callable[[DiffusionFrame], None]) -> bytes:
    message = DiffusionFrame.FromString(frame)
    change(message)
    return message.SerializeToString()


def header(change: Callable[[kv_pb2.KVHeader], None]) -> Callable[[Frames], Frames]:
    def tamper(fs: Frames) -> Frames:
        fs[0] = edit(fs[0], lambda m: change(m.header))
        return fs

    return tamper


def chunk(index: int, change: Callable[[kv_pb2.KVChunk], None]) -> Callable[[Frames], Frames]:
    def tamper(fs: Frames) -> Frames:
        fs[index] = edit(fs[index], lambda m: change(m.chunk))
        return fs

    return tamper


def trailer(change: Callable[[kv_pb2.KVTrailer], None]) -> Callable[[Frames], Frames]:
    def tamper(fs: Frames) -> Frames:
        fs[-1] = edit(fs[-1], lambda m: change(m.trailer))
        return fs

    return tamper


def flip_data_byte(c: kv_pb2.KVChunk) -> None:
    c.data = bytes([c.data[0] ^ 0x01]) + c.data[1:]


def corrupt_and_fix_crc(c: kv_pb2.KVChunk) -> None:
    flip_data_byte(c)
    c.crc32c = crc32c(c.data)


def move_to(offset: int) -> Callable[[kv_pb2.KVChunk], None]:
    """Make the chunk carry the real payload bytes at `offset`, with a correct CRC."""

    def change(c: kv_pb2.KVChunk) -> None:
        c.offset = offset
        c.data = PAYLOAD[offset : offset + CHUNK]
        c.crc32c = crc32c(c.data)

    return change


def grow_by_one(c: kv_pb2.KVChunk) -> None:
    """One more payload byte: the chunk now reaches into the next tensor."""
    c.data = PAYLOAD[c.offset : c.offset + len(c.data) + 1]
    c.crc32c = crc32c(c.data)


def set_kind(i: int, kind: int) -> Callable[[kv_pb2.KVHeader], None]:
    def change(h: kv_pb2.KVHeader) -> None:
        h.contexts[i].kind = kind

    return change


def setter(field: str, value) -> Callable:
    return lambda m: setattr(m, field, value)


CORRUPT, CONTRACT, TOO_LARGE = Fault.CORRUPT, Fault.CONTRACT, Fault.TOO_LARGE
CASES: dict[str, tuple[Callable[[Frames], Frames], Fault, str]] = {
    # corruption -> DATA_LOSS
    "crc": (
        chunk(3, flip_data_byte),
        CORRUPT,
        "CRC mismatch in the chunk at offset 128 .*layer 0 K",
    ),
    "digest": (
        trailer(lambda t: setattr(t, "payload_crc32c", t.payload_crc32c ^ 1)),
        CORRUPT,
        "payload digest mismatch",
    ),
    "data changed with its crc": (
        chunk(2, corrupt_and_fix_crc),
        CORRUPT,
        "payload digest mismatch",
    ),
    # contract -> INVALID_ARGUMENT
    "version": (header(setter("protocol_version", 2)), CONTRACT, "unsupported protocol version 2"),
    "fingerprint": (
        header(setter("model_fingerprint", "other")),
        CONTRACT,
        "model fingerprint mismatch: sender has 'other'",
    ),
    "unknown dtype": (header(setter("dtype", 9)), CONTRACT, "unknown dtype 9"),
    "unset dtype": (header(setter("dtype", 0)), CONTRACT, "unknown dtype 0"),
    "layers": (
        header(setter("num_layers", 3)),
        CONTRACT,
        "shape mismatch: header has num_layers=3, the model has 2",
    ),
    "kv heads": (header(setter("num_kv_heads", 4)), CONTRACT, "num_kv_heads=4"),
    "head dim": (header(setter("head_dim", 16)), CONTRACT, "head_dim=16"),
    "total bytes": (
        header(lambda h: setattr(h, "total_bytes", h.total_bytes + 2)),
        CONTRACT,
        "declares 2050 payload bytes but its contexts need 2048",
    ),
    "token count": (
        header(lambda h: setattr(h.contexts[0], "num_tokens", 6)),
        CONTRACT,
        "declares 2048 payload bytes but its contexts need 2304",
    ),
    "repeated kind": (
        header(set_kind(1, kv_pb2.CONTEXT_KIND_COND)),
        CONTRACT,
        "context kind cond appears more than once",
    ),
    "unknown kind": (header(set_kind(0, 7)), CONTRACT, "context 0 has unknown kind 7"),
    "no contexts": (header(lambda h: h.ClearField("contexts")), CONTRACT, "1 to 3 contexts, got 0"),
    "zero chunk size": (header(setter("chunk_size", 0)), CONTRACT, "chunk size 0 is outside"),
    "chunk over declared size": (
        header(setter("chunk_size", 32)),
        CONTRACT,
        "chunk of 64 bytes exceeds the declared chunk size 32",
    ),
    "offset out of range": (
        chunk(1, setter("offset", 10_000)),
        CONTRACT,
        r"chunk bytes \[10000, 10064\) lie outside context 0 \(cond\) layer 0 K, "
        r"which is \[0, 320\)",
    ),
    "chunk one byte past its tensor": (
        lambda fs: chunk(5, grow_by_one)(header(setter("chunk_size", CHUNK + 1))(fs)),
        CONTRACT,
        r"chunk bytes \[256, 321\) lie outside context 0 \(cond\) layer 0 K, which is \[0, 320\)",
    ),
    "context out of range": (
        chunk(1, setter("context", 7)),
        CONTRACT,
        r"chunk context 7 out of range \(3\)",
    ),
    "layer out of range": (
        chunk(1, setter("layer", 2)),
        CONTRACT,
        r"chunk layer 2 out of range \(2\)",
    ),
    "neither K nor V": (
        chunk(1, setter("tensor", 0)),
        CONTRACT,
        "chunk tensor 0 is neither K nor V",
    ),
    "empty chunk": (chunk(1, setter("data", b"")), CONTRACT, "empty chunk at offset 0"),
    "gap": (
        lambda fs: fs[:2] + fs[3:],
        CONTRACT,
        "gap in context 0 .cond. layer 0 K: expected offset 64 next, got 128",
    ),
    "overlap": (
        chunk(2, move_to(32)),
        CONTRACT,
        r"chunk at offset 32 overlaps bytes of context 0 \(cond\) layer 0 K already "
        r"received \(up to 64\)",
    ),
    "duplicate": (lambda fs: fs[:2] + fs[1:], CONTRACT, "duplicate chunk at offset 0"),
    "missing last chunk": (
        lambda fs: fs[:-2] + fs[-1:],
        CONTRACT,
        "gap: the trailer came with 64 payload bytes missing; 1 of 12 tensors incomplete, "
        "the first context 2 layer 1 V",
    ),
    "chunk count": (
        trailer(lambda t: setattr(t, "chunk_count", t.chunk_count + 1)),
        CONTRACT,
        "trailer counts 33 chunks, 32 arrived",
    ),
    "missing header": (lambda fs: fs[1:], CONTRACT, "missing header: the first frame is a chunk"),
    "trailer first": (lambda fs: fs[-1:], CONTRACT, "missing header: the first frame is a trailer"),
    "repeated header": (lambda fs: fs[:2] + fs[:1] + fs[2:], CONTRACT, "repeated header"),
    "chunk after trailer": (
        lambda fs: fs + fs[1:2],
        CONTRACT,
        "data after the trailer: a chunk frame",
    ),
    "second trailer": (
        lambda fs: fs + fs[-1:],
        CONTRACT,
        "data after the trailer: a second trailer",
    ),
    "early end": (
        lambda fs: fs[:-1],
        CONTRACT,
        r"stream ended before the trailer \(early end\): 2048 of 2048",
    ),
    "empty stream": (lambda fs: [], CONTRACT, "stream ended before the header"),
    "truncated frame": (
        lambda fs: fs[:1] + [fs[1][:-3]] + fs[2:],
        CONTRACT,
        "malformed frame: field 2 declares",
    ),
    "two frames in one": (
        lambda fs: [fs[0] + fs[1]] + fs[2:],
        CONTRACT,
        "exactly one of header, chunk, trailer; got 2",
    ),
    "not a frame": (
        lambda fs: fs[:1] + [b"\x0f"] + fs[1:],
        CONTRACT,
        r"malformed frame: unsupported wire type 7 \(field 1\)",
    ),
}


def run(fs: Frames, spec: KVSpec = SPEC, max_bytes: int = 1 << 20):
    buffers = RecordingBuffers()
    assembler = FrameAssembler(spec, max_bytes=max_bytes, buffers=buffers)
    with pytest.raises(TransportError) as caught:
        for frame in fs:
            assembler.feed(frame)
        assembler.finish()
    return caught.value, assembler, buffers


def test_the_untampered_stream_is_accepted():
    assert len(frames()) == 34 and len(PAYLOAD) == 2048
    # the digest is the CRC-32C of the whole payload in payload order, for any implementation
    assert DiffusionFrame.FromString(frames()[-1]).trailer.payload_crc32c == crc32c(PAYLOAD)
    assembler = FrameAssembler(SPEC)
    for frame in frames():
        assembler.feed(frame)
    assert assembler.finish().cache.layout.total_bytes == 2048


@pytest.mark.parametrize("name", list(CASES))
def test_tampered_stream_fails_with_its_status_and_message_and_holds_no_buffer(name):
    tamper, fault, message = CASES[name]
    error, assembler, buffers = run(tamper(frames()))
    assert error.fault is fault, error
    assert (
        status_code(error)
        is {
            CORRUPT: grpc.StatusCode.DATA_LOSS,
            CONTRACT: grpc.StatusCode.INVALID_ARGUMENT,
        }[fault]
    )
    assert re.search(message, error.message), error.message
    assert not assembler.holds_buffer
    assert buffers.outstanding == {}


def test_a_chunk_that_ends_exactly_at_its_tensors_end_is_accepted():
    fs = header(setter("chunk_size", CHUNK + 1))(frames())
    assert DiffusionFrame.FromString(fs[5]).chunk.offset + CHUNK == 320  # the end of cond L0 K
    assembler = FrameAssembler(SPEC)
    for frame in fs:
        assembler.feed(frame)
    assert assembler.finish().cache.layout.total_bytes == len(PAYLOAD)


def test_payload_of_exactly_the_limit_is_accepted():
    assembler = FrameAssembler(SPEC, max_bytes=len(PAYLOAD))
    for frame in frames():
        assembler.feed(frame)
    assert assembler.finish().cache.layout.total_bytes == len(PAYLOAD)


def test_payload_over_the_limit_is_resource_exhausted_before_any_allocation():
    error, assembler, buffers = run(frames(), max_bytes=2047)
    assert error.fault is TOO_LARGE
    assert status_code(error) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.message == "KV payload of 2048 bytes exceeds this receiver's limit of 2047 bytes"
    assert buffers.requested == [] and not assembler.holds_buffer


def test_dtype_the_model_does_not_take_is_rejected():
    spec = KVSpec(
        FINGERPRINT, SPEC.num_layers, SPEC.num_kv_heads, SPEC.head_dim, dtypes=(torch.bfloat16,)
    )
    error, _, buffers = run(frames(), spec=spec)
    assert error.fault is CONTRACT
    assert "dtype torch.float32 is not accepted here (accepted: torch.bfloat16)" in error.message
    assert buffers.requested == []


def test_header_without_cond_context_is_rejected():
    fs = list(
        encode_kv(
            dict(list(CONTEXTS.items())[:2]),
            request_id="t",
            fingerprint=FINGERPRINT,
            chunk_size=CHUNK,
        )
    )
    fs[0] = edit(fs[0], lambda m: set_kind(0, kv_pb2.CONTEXT_KIND_UNCOND_IMG)(m.header))
    error, _, _ = run(fs)
    assert error.fault is CONTRACT and error.message == "the header has no cond context"


def test_a_failed_assembler_refuses_further_frames_with_the_same_error():
    fs = frames()
    fs[3] = chunk(3, flip_data_byte)(fs)[3]
    assembler = FrameAssembler(SPEC)
    for frame in fs[:3]:
        assembler.feed(frame)
    with pytest.raises(TransportError) as first:
        assembler.feed(fs[3])
    with pytest.raises(TransportError) as again:
        assembler.feed(fs[4])
    assert again.value is first.value
    with pytest.raises(TransportError):
        assembler.finish()


def test_closing_mid_stream_gives_the_buffer_back():
    buffers = RecordingBuffers()
    with FrameAssembler(SPEC, buffers=buffers) as assembler:
        for frame in frames()[:5]:
            assembler.feed(frame)
        assert assembler.holds_buffer and len(buffers.outstanding) == 1
    assert not assembler.holds_buffer and buffers.outstanding == {}
    with pytest.raises(TransportError, match="after the stream ended"):
        assembler.feed(frames()[5])


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        (Fault.CORRUPT, grpc.StatusCode.DATA_LOSS),
        (Fault.CONTRACT, grpc.StatusCode.INVALID_ARGUMENT),
        (Fault.TOO_LARGE, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (Fault.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE),
        (Fault.IDLE, grpc.StatusCode.DEADLINE_EXCEEDED),
        (Fault.BUSY, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (Fault.NOT_FINITE, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_each_fault_maps_to_one_status(fault, code):
    assert status_code(TransportError(fault, "x")) is code


# ---- bounded uploads: idle timeout, byte budget; finite values ---------------------------------


async def _stalling(fs: Frames, stop_after: int) -> AsyncIterator[bytes]:
    """A sender that sends `stop_after` frames and then keeps its stream open, silent."""
    for frame in fs[:stop_after]:
        yield frame
    await asyncio.sleep(3600)


async def _sending(fs: Frames) -> AsyncIterator[bytes]:
    for frame in fs:
        yield frame


def test_an_upload_that_stops_sending_is_deadline_exceeded_and_gives_its_buffer_back():
    buffers, budget = RecordingBuffers(), UploadBudget(1 << 20)
    assembler = FrameAssembler(SPEC, buffers=buffers, budget=budget)
    started = time.monotonic()
    with pytest.raises(TransportError) as info:
        asyncio.run(receive_kv(_stalling(frames(), 5), assembler, idle_timeout_s=0.2))
    assert 0.2 <= time.monotonic() - started < 2.0
    assert status_code(info.value) is grpc.StatusCode.DEADLINE_EXCEEDED
    assert info.value.message == (
        "no KV frame for 0.2 s after 256 of 2048 payload bytes: the upload was abandoned"
    )
    assert buffers.outstanding == {} and budget.held_bytes == 0
    # a complete upload with the same timeout is unaffected
    again = FrameAssembler(SPEC, buffers=buffers, budget=budget)
    received = asyncio.run(receive_kv(_sending(frames()), again, idle_timeout_s=0.2))
    assert received.cache.layout.total_bytes == 2048 and budget.held_bytes == 0


def test_uploads_beyond_the_in_flight_budget_are_resource_exhausted_before_any_allocation():
    budget = UploadBudget(3000)  # room for one 2048-byte upload, not two
    first = FrameAssembler(SPEC, budget=budget)
    for frame in frames()[:3]:
        first.feed(frame)
    assert budget.held_bytes == 2048
    buffers = RecordingBuffers()
    second = FrameAssembler(SPEC, buffers=buffers, budget=budget)
    with pytest.raises(TransportError) as info:
        second.feed(frames()[0])
    assert status_code(info.value) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.message == (
        "uploads in flight already hold 2048 bytes; 2048 more would exceed the limit of 3000 "
        "bytes for all uploads in flight: retry later"
    )
    assert buffers.requested == [] and budget.held_bytes == 2048
    first.close()  # the first upload ends (here: cancelled); its bytes are free again
    assert budget.held_bytes == 0
    third = FrameAssembler(SPEC, budget=budget)
    for frame in frames():
        third.feed(frame)
    received = third.finish()  # handed to the job: no longer an upload in flight
    assert budget.held_bytes == 0 and received.cache.layout.total_bytes == 2048


def _received(contexts: dict) -> object:
    assembler = FrameAssembler(spec_for(contexts))
    for frame in encode_kv(contexts, request_id="t", fingerprint=FINGERPRINT, chunk_size=CHUNK):
        assembler.feed(frame)
    return assembler.finish().cache


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_kv_cache_with_nan_or_inf_is_invalid_argument_naming_the_first_tensor(dtype, bad):
    contexts = make_contexts([5, 0, 3], dtype=dtype, layers=2)
    check_finite(_received(contexts))  # finite: passes
    c = contexts[list(contexts)[2]]
    values = list(c.values)
    values[1] = values[1].clone()
    values[1][2, 1, 3] = bad
    contexts[list(contexts)[2]] = ContextKV(list(c.keys), values, c.next_rope_position)
    with pytest.raises(TransportError) as info:
        check_finite(_received(contexts))
    assert status_code(info.value) is grpc.StatusCode.INVALID_ARGUMENT
    assert "the KV cache holds NaN or Inf values (first in context 2 (uncond_img) layer 1 V)" in (
        info.value.message
    )


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (chunk(1, setter("context", 3)), "^chunk context 3 out of range \\(3\\)$"),
        (
            chunk(22, move_to(0)),
            r"^chunk bytes \[0, 64\) lie outside context 0 \(cond\) layer 1 V, which is "
            r"\[960, 1280\)$",
        ),
        (
            lambda fs: fs[:27] + [fs[26]] + fs[27:],
            r"^duplicate chunk at offset 1216 \(context 0 \(cond\) layer 1 V\)$",
        ),
    ],
    ids=["context-one-past-the-last", "outside-its-tensor", "duplicate-last-chunk"],
)
def test_a_chunk_violation_names_the_tensor_it_belongs_to(tamper, message):
    fs = frames()
    assert DiffusionFrame.FromString(fs[22]).chunk.offset == 960  # cond layer 1 V starts here
    error, _, buffers = run(tamper(fs))
    assert error.fault is CONTRACT and re.search(message, error.message), error.message
    assert buffers.outstanding == {}


def test_an_empty_cache_is_finite():
    contexts = make_contexts([0], dtype=torch.float32, layers=2)
    cache = _received(contexts)
    assert cache.flat.numel() == 0
    check_finite(cache)


EXACT_MESSAGES = {
    "missing header": "missing header: the first frame is a chunk",
    "trailer first": "missing header: the first frame is a trailer",
    "repeated header": "repeated header",
    "chunk after trailer": "data after the trailer: a chunk frame",
    "second trailer": "data after the trailer: a second trailer",
    "early end": "stream ended before the trailer (early end): 2048 of 2048 payload bytes arrived",
    "empty stream": "stream ended before the header (early end)",
    "truncated frame": "malformed frame: field 2 declares 79 bytes, 76 remain",
    "missing last chunk": "gap: the trailer came with 64 payload bytes missing; 1 of 12 tensors "
    "incomplete, the first context 2 layer 1 V (64 bytes short)",
    "unknown dtype": "unknown dtype 9 in the header",
}


@pytest.mark.parametrize("name", list(EXACT_MESSAGES))
def test_a_tampered_streams_message_is_exactly_what_went_wrong(name):
    tamper, _, _ = CASES[name]
    error, _, _ = run(tamper(frames()))
    assert error.message == EXACT_MESSAGES[name]


def test_a_header_after_the_trailer_is_named():
    error, _, _ = run(frames() + frames()[:1])
    assert error.message == "data after the trailer: a header frame"


def test_a_frame_is_parsed_from_any_bytes_like_object():
    frame = frames()[1]
    want = parse_frame(frame)
    for given in (bytearray(frame), memoryview(frame)):
        got = parse_frame(given)
        assert got._replace(frame=b"") == want._replace(frame=b"")
        assert bytes(got.frame) == frame
