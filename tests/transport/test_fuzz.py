"""Hypothesis fuzz of the frame decoder: whatever arrives, only TransportError escapes and no
buffer larger than the limit is ever asked for."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos import DiffusionFrame, kv_pb2
from transport import FrameAssembler, KVSpec, TransportError, encode_kv

from .factory import FINGERPRINT, RecordingBuffers, make_contexts, spec_for

CONTEXTS = make_contexts([3, 0, 2], dtype=torch.float16, layers=2, heads=2, head_dim=4)
SPEC = spec_for(CONTEXTS)
FRAMES = list(encode_kv(CONTEXTS, request_id="f", fingerprint=FINGERPRINT, chunk_size=24))
LIMIT = 4096
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def feed_all(frames: list[bytes], spec: KVSpec = SPEC) -> None:
    """Feed and finish; assert the decoder's promises whatever happens."""
    buffers = RecordingBuffers()
    assembler = FrameAssembler(spec, max_bytes=LIMIT, buffers=buffers)
    try:
        for frame in frames:
            assembler.feed(frame)
        received = assembler.finish()
    except TransportError:
        assert not assembler.holds_buffer
        assert buffers.outstanding == {}
    else:
        received.cache.release()
        assert buffers.outstanding == {}
    assert all(n <= LIMIT for n in buffers.requested)
    assert len(buffers.requested) <= 1


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_random_bytes_only_raise_transport_error(frames):
    feed_all(frames)


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_random_bytes_after_a_valid_header_only_raise_transport_error(tail):
    feed_all(FRAMES[:1] + tail)


@st.composite
def mutated_streams(draw) -> list[bytes]:
    """A real stream with a few byte flips, cuts, drops, duplicates and swaps."""
    frames = list(FRAMES)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(frames) - 1))
        action = draw(st.sampled_from(["flip", "cut", "drop", "dup", "swap", "insert"]))
        frame = frames[i]
        if action == "flip" and frame:
            pos = draw(st.integers(0, len(frame) - 1))
            bit = 1 << draw(st.integers(0, 7))
            frames[i] = frame[:pos] + bytes([frame[pos] ^ bit]) + frame[pos + 1 :]
        elif action == "cut":
            frames[i] = frame[: draw(st.integers(0, len(frame)))]
        elif action == "drop":
            del frames[i]
        elif action == "dup":
            frames.insert(i, frame)
        elif action == "swap":
            j = draw(st.integers(0, len(frames) - 1))
            frames[i], frames[j] = frames[j], frame
        else:
            frames.insert(i, draw(st.binary(max_size=40)))
        if not frames:
            break
    return frames


@FUZZ
@given(mutated_streams())
def test_mutated_real_streams_only_raise_transport_error(frames):
    feed_all(frames)


uint32 = st.integers(0, 2**32 - 1)
headers = st.builds(
    kv_pb2.KVHeader,
    protocol_version=st.sampled_from([0, 1, 1, 1, 2]),
    model_fingerprint=st.sampled_from([FINGERPRINT, FINGERPRINT, "x"]),
    dtype=st.integers(0, 4),
    num_layers=st.sampled_from([SPEC.num_layers, 0, 2**32 - 1]),
    num_kv_heads=st.sampled_from([SPEC.num_kv_heads, 0]),
    head_dim=st.sampled_from([SPEC.head_dim, 1]),
    contexts=st.lists(
        st.builds(
            kv_pb2.ContextInfo, kind=st.integers(0, 4), num_tokens=uint32, next_rope_position=uint32
        ),
        max_size=4,
    ),
    total_bytes=st.integers(0, 2**64 - 1),
    chunk_size=uint32,
)
chunks = st.builds(
    kv_pb2.KVChunk,
    context=st.integers(0, 3),
    layer=st.integers(0, 2),
    tensor=st.integers(0, 3),
    offset=st.integers(0, 2**64 - 1) | st.integers(0, 300),
    crc32c=uint32,
    data=st.binary(max_size=48),
)
trailers = st.builds(kv_pb2.KVTrailer, chunk_count=uint32, payload_crc32c=uint32)
frames_of_fields = st.one_of(
    headers.map(lambda h: DiffusionFrame(header=h)),
    chunks.map(lambda c: DiffusionFrame(chunk=c)),
    trailers.map(lambda t: DiffusionFrame(trailer=t)),
).map(DiffusionFrame.SerializeToString)


@FUZZ
@given(st.lists(frames_of_fields, max_size=6))
def test_well_formed_frames_with_arbitrary_fields_only_raise_transport_error(frames):
    feed_all(frames)


@FUZZ
@given(headers)
def test_no_header_makes_the_assembler_allocate_beyond_its_limit(header):
    """Token counts up to 2**32 and any declared total: the limit holds before allocating."""
    header_frame = DiffusionFrame(header=header).SerializeToString()
    feed_all([header_frame])


@st.composite
def consistent_headers(draw) -> bytes:
    """Headers that pass every check except, often, the size limit."""
    tokens = draw(st.lists(st.integers(0, 2**20), min_size=1, max_size=3))
    kinds = [
        kv_pb2.CONTEXT_KIND_COND,
        kv_pb2.CONTEXT_KIND_UNCOND_TEXT,
        kv_pb2.CONTEXT_KIND_UNCOND_IMG,
    ]
    per_token = 2 * SPEC.num_layers * SPEC.num_kv_heads * SPEC.head_dim * 2  # K and V, fp16
    header = kv_pb2.KVHeader(
        protocol_version=1,
        model_fingerprint=FINGERPRINT,
        dtype=kv_pb2.DTYPE_FP16,
        num_layers=SPEC.num_layers,
        num_kv_heads=SPEC.num_kv_heads,
        head_dim=SPEC.head_dim,
        contexts=[
            kv_pb2.ContextInfo(kind=k, num_tokens=n) for k, n in zip(kinds, tokens, strict=False)
        ],
        total_bytes=sum(tokens) * per_token,
        chunk_size=draw(st.integers(1, 64)),
    )
    return DiffusionFrame(header=header).SerializeToString()


@FUZZ
@given(consistent_headers(), st.lists(frames_of_fields, max_size=3))
def test_valid_headers_never_allocate_beyond_the_limit(header, rest):
    feed_all([header, *rest])
