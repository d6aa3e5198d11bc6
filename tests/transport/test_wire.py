"""The chunk fast path of the frame decoder agrees with the general decoder, and the assembler's
copy-then-checksum still catches every corrupted byte of a chunk as written."""

from __future__ import annotations

import pytest
import torch

from protos import DiffusionFrame
from transport import Fault, FrameAssembler, TransportError, encode_kv
from transport.wire import ChunkFrame, _parse_any, _parse_chunk_as_written, _tag, parse_frame

from .factory import FINGERPRINT, RecordingBuffers, make_contexts, spec_for

# fp32, 2 layers, 8 heads x 128 dims: a cond K or V of 300 tokens is 1,228,800 bytes, so 640 KB
# chunks hold more than one of the assembler's 256 KiB copy-and-checksum pieces, and end short.
CONTEXTS = make_contexts([300, 0, 7], dtype=torch.float32, layers=2, heads=8, head_dim=128)
CHUNK = 640_000


def frames() -> list[bytes]:
    return list(encode_kv(CONTEXTS, request_id="w", fingerprint=FINGERPRINT, chunk_size=CHUNK))


def content(chunk: ChunkFrame) -> tuple:
    data = chunk.frame[chunk.data_start : chunk.data_end]
    return chunk.context, chunk.layer, chunk.tensor, chunk.offset, chunk.crc32c, data


def test_fast_path_parses_every_chunk_as_written_exactly_as_the_general_decoder():
    chunks = frames()[1:-1]
    assert chunks
    for frame in chunks:
        fast = _parse_chunk_as_written(frame)
        assert isinstance(fast, ChunkFrame)
        assert fast == _parse_any(frame)


def test_fast_path_leaves_other_encodings_to_the_general_decoder():
    header, chunk, trailer = frames()[0], frames()[1], frames()[-1]
    reserialized = DiffusionFrame.FromString(chunk).SerializeToString()  # context 0 left out
    assert _parse_chunk_as_written(header) is None
    assert _parse_chunk_as_written(trailer) is None
    assert _parse_chunk_as_written(reserialized) is None
    assert _parse_chunk_as_written(chunk + b"\x08\x01") is None  # a field after the data
    assert _parse_chunk_as_written(chunk[:-1]) is None  # truncated
    assert _parse_chunk_as_written(b"") is None
    assert content(parse_frame(reserialized)) == content(parse_frame(chunk))


@pytest.mark.parametrize("where", [0, 300_000, -1])
def test_a_flipped_byte_anywhere_in_a_chunk_is_data_loss_and_frees_the_buffer(where):
    fs = frames()
    index = 1  # cond layer 0 K, the first 640,000 of its bytes: three copy pieces
    assert len(fs[index]) > CHUNK
    position = len(fs[index]) - 1 if where == -1 else len(fs[index]) - CHUNK + where
    tampered = bytearray(fs[index])
    tampered[position] ^= 0x40
    fs[index] = bytes(tampered)
    buffers = RecordingBuffers()
    assembler = FrameAssembler(spec_for(CONTEXTS), buffers=buffers)
    with pytest.raises(TransportError) as info:
        for frame in fs:
            assembler.feed(frame)
    assert info.value.fault is Fault.CORRUPT
    assert "CRC mismatch in the chunk at offset 0 (context 0 (cond) layer 0 K)" in str(info.value)
    assert not assembler.holds_buffer and not buffers.outstanding


def test_a_field_key_is_the_varint_of_number_shifted_by_3_or_wire_type():
    assert _tag(6, 2) == b"\x32"
    assert _tag(5, 5) == b"\x2d"
    assert _tag(16, 0) == b"\x80\x01"  # 16 << 3 = 128 takes two varint bytes
