"""Protobuf wire format for `DiffusionFrame`, hand-written where it saves copies of chunk data.

A chunk frame is encoded as a small prefix followed by the raw data bytes, which is exactly the
protobuf encoding of `DiffusionFrame{chunk: KVChunk{..., data}}` with `data` as the last field, so
any protobuf reader accepts it. Parsing finds `data` as a slice of the received frame instead of
copying it into a message object; headers and trailers, which are small, go through protobuf.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any, NamedTuple

from google.protobuf.message import DecodeError

from protos import kv_pb2
from transport.errors import Fault, TransportError

PROTOCOL_VERSION = 1
DEFAULT_CHUNK_SIZE = 1 << 20  # the best for Python gRPC (docs/benchmarks.md)
MAX_CHUNK_SIZE = 16 << 20

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_FRAME_HEADER, _FRAME_CHUNK, _FRAME_TRAILER = 1, 2, 3
# KVChunk field numbers and the wire type each must have.
_CHUNK_FIELDS = {1: _VARINT, 2: _VARINT, 3: _VARINT, 4: _VARINT, 5: _I32, 6: _LEN}


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _ONE_BYTE[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_ONE_BYTE = tuple(bytes((value,)) for value in range(0x80))


def _tag(field_number: int, wire_type: int) -> bytes:
    return _varint(field_number << 3 | wire_type)


# The keys of the fields `chunk_prefix` writes, in the order it writes them.
_FRAME_CHUNK_KEY = _tag(_FRAME_CHUNK, _LEN)
_CONTEXT_KEY, _LAYER_KEY, _TENSOR_KEY, _OFFSET_KEY = (_tag(n, _VARINT) for n in (1, 2, 3, 4))
_CRC_KEY, _DATA_KEY = _tag(5, _I32), _tag(6, _LEN)


def chunk_prefix(
    context: int, layer: int, tensor: int, offset: int, crc32c: int, data_len: int
) -> bytes:
    """Serialized `DiffusionFrame` up to the chunk's data; append exactly `data_len` bytes."""
    inner = b"".join(
        (
            _CONTEXT_KEY,
            _varint(context),
            _LAYER_KEY,
            _varint(layer),
            _TENSOR_KEY,
            _varint(tensor),
            _OFFSET_KEY,
            _varint(offset),
            _CRC_KEY,
            struct.pack("<I", crc32c),
            _DATA_KEY,
            _varint(data_len),
        )
    )
    return b"".join((_FRAME_CHUNK_KEY, _varint(len(inner) + data_len), inner))


def header_frame(header: kv_pb2.KVHeader) -> bytes:
    return kv_pb2.DiffusionFrame(header=header).SerializeToString()


def trailer_frame(trailer: kv_pb2.KVTrailer) -> bytes:
    return kv_pb2.DiffusionFrame(trailer=trailer).SerializeToString()


class ChunkFrame(NamedTuple):
    """A parsed `KVChunk`; its data is bytes [data_start, data_end) of `frame`, not a copy.

    A named tuple because one is built per chunk: it constructs several times faster than a
    frozen dataclass.
    """

    context: int
    layer: int
    tensor: int
    offset: int
    crc32c: int
    frame: bytes
    data_start: int
    data_end: int

    @property
    def size(self) -> int:
        return self.data_end - self.data_start

    def __repr__(self) -> str:
        return (
            f"ChunkFrame(context={self.context}, layer={self.layer}, tensor={self.tensor}, "
            f"offset={self.offset}, crc32c={self.crc32c:#010x}, size={self.size})"
        )


def _malformed(what: str) -> TransportError:
    return TransportError(Fault.CONTRACT, f"malformed frame: {what}")


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    if pos < end and buf[pos] < 0x80:  # most varints of a frame are one byte
        return buf[pos], pos + 1
    result = shift = 0
    while True:
        if pos >= end:
            raise _malformed("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _malformed("varint longer than 10 bytes")


def _fields(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, int, Any]]:
    """Yield (field number, wire type, value or (start, end) of a LEN field) from buf[pos:end]."""
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise _malformed("field number 0")
        if wire_type == _VARINT:
            value, pos = _read_varint(buf, pos, end)
            yield number, wire_type, value
        elif wire_type == _LEN:
            length, pos = _read_varint(buf, pos, end)
            if length > end - pos:
                raise _malformed(f"field {number} declares {length} bytes, {end - pos} remain")
            yield number, wire_type, (pos, pos + length)
            pos += length
        elif wire_type in (_I32, _I64):
            width = 4 if wire_type == _I32 else 8
            if width > end - pos:
                raise _malformed(f"field {number} truncated")
            yield number, wire_type, int.from_bytes(buf[pos : pos + width], "little")
            pos += width
        else:
            raise _malformed(f"unsupported wire type {wire_type} (field {number})")


def parse_frame(frame: bytes) -> kv_pb2.KVHeader | ChunkFrame | kv_pb2.KVTrailer:
    """Decode one serialized `DiffusionFrame`; raise TransportError if it is not exactly one of
    header, chunk or trailer. Unknown fields are skipped, as protobuf does."""
    if not isinstance(frame, bytes):
        frame = bytes(frame)
    chunk = _parse_chunk_as_written(frame)
    if chunk is not None:
        return chunk
    return _parse_any(frame)


def _parse_any(frame: bytes) -> kv_pb2.KVHeader | ChunkFrame | kv_pb2.KVTrailer:
    """`parse_frame` for any valid encoding: fields in any order, unknown fields, defaults left
    out (as a protobuf library writes them)."""
    found: list[tuple[int, int, int]] = []
    for number, wire_type, value in _fields(frame, 0, len(frame)):
        if number in (_FRAME_HEADER, _FRAME_CHUNK, _FRAME_TRAILER):
            if wire_type != _LEN:
                raise _malformed(f"frame field {number} has wire type {wire_type}")
            found.append((number, *value))
    if len(found) != 1:
        raise _malformed(f"a frame carries exactly one of header, chunk, trailer; got {len(found)}")
    number, start, end = found[0]
    if number == _FRAME_CHUNK:
        return _parse_chunk(frame, start, end)
    message = kv_pb2.KVHeader() if number == _FRAME_HEADER else kv_pb2.KVTrailer()
    try:
        message.ParseFromString(frame[start:end])
    except DecodeError as e:
        raise _malformed(f"{message.DESCRIPTOR.name}: {e}") from None
    return message


def _parse_chunk(frame: bytes, start: int, end: int) -> ChunkFrame:
    values = {1: 0, 2: 0, 3: 0, 4: 0, 5: 0}
    data = (start, start)
    for number, wire_type, value in _fields(frame, start, end):
        expected = _CHUNK_FIELDS.get(number)
        if expected is None:
            continue
        if wire_type != expected:
            raise _malformed(f"KVChunk field {number} has wire type {wire_type}")
        if number == 6:
            data = value
        else:
            values[number] = value
    return ChunkFrame(
        context=values[1],
        layer=values[2],
        tensor=values[3],
        offset=values[4],
        crc32c=values[5],
        frame=frame,
        data_start=data[0],
        data_end=data[1],
    )


def _parse_chunk_as_written(frame: bytes) -> ChunkFrame | None:
    """The chunk in `frame` if it is laid out exactly as `chunk_prefix` writes it (every field, in
    field order, the data last), else None: then the general parser, which accepts any valid
    encoding and names what is wrong, decides. The result is the one the general parser gives;
    this only saves its per-field Python work on every chunk.
    """
    end = len(frame)
    try:
        if frame[0] != _FRAME_CHUNK_KEY[0]:
            return None
        length, pos = _read_varint(frame, 1, end)
        if pos + length != end or frame[pos] != _CONTEXT_KEY[0]:
            return None
        context, pos = _read_varint(frame, pos + 1, end)
        if frame[pos] != _LAYER_KEY[0]:
            return None
        layer, pos = _read_varint(frame, pos + 1, end)
        if frame[pos] != _TENSOR_KEY[0]:
            return None
        tensor, pos = _read_varint(frame, pos + 1, end)
        if frame[pos] != _OFFSET_KEY[0]:
            return None
        offset, pos = _read_varint(frame, pos + 1, end)
        if frame[pos] != _CRC_KEY[0] or frame[pos + 5] != _DATA_KEY[0]:
            return None
        crc32c = int.from_bytes(frame[pos + 1 : pos + 5], "little")
        size, pos = _read_varint(frame, pos + 6, end)
        if pos + size != end:
            return None
    except (IndexError, TransportError):  # the general parser names what is wrong
        return None
    return ChunkFrame(context, layer, tensor, offset, crc32c, frame, pos, end)
