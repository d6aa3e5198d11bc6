"""Frames -> one verified flat buffer -> per-context, per-layer K/V tensor views.

`FrameAssembler` checks every frame against the header and the receiver's model (`KVSpec`),
copies each chunk's bytes once, straight from the received frame to its offset in a buffer of the
declared size, and hands out views of that buffer. Any violation raises `TransportError`, after
which the assembler holds no buffer. `check_finite` then refuses a cache with NaN or Inf in it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import torch

from protos import GenerationParams, kv_pb2
from transport import crc, wire
from transport.admission import Upload, UploadBudget
from transport.buffers import Buffers, FreshBuffers
from transport.errors import Fault, TransportError
from transport.layout import (
    CONTEXT_KINDS,
    DTYPE_TO_WIRE,
    KEY,
    MAX_CONTEXTS,
    VALUE,
    WIRE_TO_DTYPE,
    ContextSpec,
    KVCache,
    KVLayout,
)
from transport.wire import MAX_CHUNK_SIZE, PROTOCOL_VERSION

DEFAULT_MAX_KV_BYTES = 1 << 30
# Copy-then-checksum granularity: small enough that the copied bytes are still in L2 (1 MiB per
# core on common servers) when the CRC reads them back.
_CACHE_PIECE = 256 << 10
_WIRE_TO_KV = {kv_pb2.KV_TENSOR_KEY: KEY, kv_pb2.KV_TENSOR_VALUE: VALUE}
ALL_DTYPES = tuple(DTYPE_TO_WIRE)


@dataclass(frozen=True)
class KVSpec:
    """What the receiving model accepts: its fingerprint, its dimensions, the dtypes it takes."""

    fingerprint: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtypes: tuple[torch.dtype, ...] = ALL_DTYPES


@dataclass
class ReceivedKV:
    """One verified request: its id and parameters from the header, and the cache."""

    request_id: str
    params: GenerationParams
    cache: KVCache


class _State(enum.Enum):
    HEADER = "expecting the header"
    ROOM = "waiting for room in the upload budget"
    CHUNKS = "receiving chunks"
    DONE = "trailer verified"
    FINISHED = "result handed out"
    FAILED = "failed"
    CLOSED = "closed"


def _contract(message: str) -> TransportError:
    return TransportError(Fault.CONTRACT, message)


class FrameAssembler:
    """Assembles one KV stream: `feed` every frame, then `finish` at the end of the stream.

    Use it as a context manager (or call `close`) so a cancelled stream also releases its buffer.
    """

    def __init__(
        self,
        expect: KVSpec,
        *,
        max_bytes: int = DEFAULT_MAX_KV_BYTES,
        buffers: Buffers | None = None,
        budget: UploadBudget | None = None,
    ) -> None:
        self.expect = expect
        self.max_bytes = max_bytes
        self.buffers: Buffers = buffers if buffers is not None else FreshBuffers()
        self.budget = budget  # shared by every upload in flight; held from header to end
        # `receive_kv` sets it: an upload that does not fit yet waits (ROOM) instead of failing.
        self.may_wait_for_room = False
        self.upload = Upload(evict=self.evict)
        self._state = _State.HEADER
        self._error: TransportError | None = None
        self._header: kv_pb2.KVHeader | None = None
        self._layout: KVLayout | None = None
        self._flat: torch.Tensor | None = None
        self._dest: memoryview | None = None
        self._flat_bytes: np.ndarray | None = None  # the same buffer, as CRC-32C reads it
        self._num_contexts = self._num_layers = self._chunk_size = 0
        self._segments: list[tuple[int, int]] = []  # (start, end) by (context, layer, kv)
        self._next: list[int] = []  # next expected offset in each segment
        self._starts: set[int] = set()  # offsets of chunks received, to name duplicates
        self._pieces: list[tuple[int, int, int]] = []  # (offset, crc, length) per chunk
        self._received_bytes = 0
        self._declared_bytes = 0

    @property
    def holds_buffer(self) -> bool:
        return self._flat is not None

    @property
    def waiting_for_room(self) -> bool:
        return self._state is _State.ROOM

    @property
    def failure(self) -> TransportError | None:
        """The error that failed the stream (an eviction, too), if one did."""
        return self._error

    @property
    def received_bytes(self) -> int:
        """Payload bytes copied into the buffer so far."""
        return self._received_bytes

    @property
    def declared_bytes(self) -> int:
        """The payload size the header declared (0 before a header arrived)."""
        return self._declared_bytes

    def __enter__(self) -> FrameAssembler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def feed(self, frame: bytes) -> None:
        """Verify one serialized `DiffusionFrame` and copy its payload, if any, into place."""
        if self._state in (_State.FAILED, _State.FINISHED, _State.CLOSED):
            raise self._error or _contract(f"frame after the stream ended ({self._state.value})")
        try:
            message = wire.parse_frame(frame)
            if isinstance(message, wire.ChunkFrame):
                self._on_chunk(message)
            elif isinstance(message, kv_pb2.KVHeader):
                self._on_header(message)
            else:
                self._on_trailer(message)
        except TransportError as e:
            self._fail(e)
            raise

    def finish(self) -> ReceivedKV:
        """Call when the stream has ended: the verified cache, now owned by the caller."""
        if self._state is _State.FAILED and self._error is not None:
            raise self._error
        if self._state is not _State.DONE:
            if self._state is _State.HEADER:
                error = _contract("stream ended before the header (early end)")
            elif self._state is _State.CHUNKS:
                total = self._layout.total_bytes if self._layout else 0
                error = _contract(
                    f"stream ended before the trailer (early end): "
                    f"{self._received_bytes} of {total} payload bytes arrived"
                )
            else:
                error = _contract(f"finish() called when {self._state.value}")
            self._fail(error)
            raise error
        assert self._header is not None and self._layout is not None and self._flat is not None
        cache = KVCache.wrap(self._layout, self._flat, on_release=self.buffers.give_back)
        self._flat, self._dest, self._flat_bytes = None, None, None
        self._unreserve()
        self._state = _State.FINISHED
        return ReceivedKV(self._header.request_id, self._header.params, cache)

    def close(self) -> None:
        """Give back the buffer unless `finish` handed it out; further frames are refused."""
        self._release()
        if self._state not in (_State.FINISHED, _State.FAILED):
            self._state = _State.CLOSED

    def _fail(self, error: TransportError) -> None:
        self._release()
        self._state, self._error = _State.FAILED, error

    def _release(self) -> None:
        flat, self._flat, self._dest, self._flat_bytes = self._flat, None, None, None
        if flat is not None:
            self.buffers.give_back(flat)
        self._unreserve()

    def _unreserve(self) -> None:
        if self.budget is not None:
            self.budget.release(self.upload)

    def evict(self, error: TransportError) -> None:
        """The budget gave this upload's room to another: fail and release the buffer; the next
        `feed` raises `error`."""
        if self._state is _State.CHUNKS:
            self._fail(error)

    def try_admit(self) -> bool:
        """In ROOM: reserve and allocate if the budget has room now (evicting stale uploads)."""
        assert self._state is _State.ROOM and self._layout is not None
        if not self.budget.try_reserve(self._layout.total_bytes, self.upload):
            return False
        self._allocate()
        return True

    def refuse_admission(self) -> TransportError:
        """In ROOM: give up waiting; fails the stream with BUSY and returns that error."""
        assert self._layout is not None and self.budget is not None
        error = self.budget.busy(self._layout.total_bytes)
        self._fail(error)
        return error

    def _on_header(self, header: kv_pb2.KVHeader) -> None:
        if self._state is _State.CHUNKS:
            raise _contract("repeated header")
        if self._state is _State.DONE:
            raise _contract("data after the trailer: a header frame")
        self._declared_bytes = header.total_bytes
        layout = self._check_header(header)
        if header.total_bytes != layout.total_bytes:
            raise _contract(
                f"header declares {header.total_bytes} payload bytes but its contexts need "
                f"{layout.total_bytes}"
            )
        if layout.total_bytes > self.max_bytes:
            raise TransportError(
                Fault.TOO_LARGE,
                f"KV payload of {layout.total_bytes} bytes exceeds this receiver's limit of "
                f"{self.max_bytes} bytes",
            )
        self._header, self._layout = header, layout
        self._segments = [
            layout.segment(ci, layer, kv)
            for ci in range(len(layout.contexts))
            for layer in range(layout.num_layers)
            for kv in (KEY, VALUE)
        ]
        self._next = [start for start, _ in self._segments]
        self._num_contexts, self._num_layers = len(layout.contexts), layout.num_layers
        self._chunk_size = header.chunk_size
        budget = self.budget
        if budget is not None and not budget.try_reserve(layout.total_bytes, self.upload):
            if self.may_wait_for_room:
                self._state = _State.ROOM
                return
            raise budget.busy(layout.total_bytes)
        self._allocate()

    def _allocate(self) -> None:
        assert self._layout is not None
        self._flat = self.buffers.take(self._layout.total_bytes)
        self._flat_bytes = self._flat.numpy()
        self._dest = memoryview(self._flat_bytes)
        self._state = _State.CHUNKS

    def _check_header(self, header: kv_pb2.KVHeader) -> KVLayout:
        expect = self.expect
        if header.protocol_version != PROTOCOL_VERSION:
            raise _contract(
                f"unsupported protocol version {header.protocol_version} "
                f"(this receiver speaks {PROTOCOL_VERSION})"
            )
        if header.model_fingerprint != expect.fingerprint:
            raise _contract(
                f"model fingerprint mismatch: sender has {header.model_fingerprint!r}, "
                f"receiver has {expect.fingerprint!r}"
            )
        dtype = WIRE_TO_DTYPE.get(header.dtype)
        if dtype is None:
            raise _contract(f"unknown dtype {header.dtype} in the header")
        if dtype not in expect.dtypes:
            accepted = ", ".join(str(d) for d in expect.dtypes)
            raise _contract(f"dtype {dtype} is not accepted here (accepted: {accepted})")
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            got, want = getattr(header, name), getattr(expect, name)
            if got != want:
                raise _contract(f"shape mismatch: header has {name}={got}, the model has {want}")
        if not 1 <= len(header.contexts) <= MAX_CONTEXTS:
            raise _contract(
                f"a header lists 1 to {MAX_CONTEXTS} contexts, got {len(header.contexts)}"
            )
        contexts = []
        for i, info in enumerate(header.contexts):
            kind = info.kind
            if kind not in CONTEXT_KINDS:
                raise _contract(f"context {i} has unknown kind {kind}")
            if any(c.kind == kind for c in contexts):
                raise _contract(f"context kind {_kind_name(kind)} appears more than once")
            prefix_of = info.prefix_of if info.HasField("prefix_of") else None
            contexts.append(ContextSpec(kind, info.num_tokens, info.next_rope_position, prefix_of))
        if not any(c.kind == kv_pb2.CONTEXT_KIND_COND for c in contexts):
            raise _contract("the header has no cond context")
        if not 0 < header.chunk_size <= MAX_CHUNK_SIZE:
            raise _contract(f"chunk size {header.chunk_size} is outside 1..{MAX_CHUNK_SIZE}")
        try:
            return KVLayout(
                dtype, header.num_layers, header.num_kv_heads, header.head_dim, tuple(contexts)
            )
        except ValueError as e:  # a prefix_of that cannot hold
            raise _contract(str(e)) from None

    def _on_chunk(self, chunk: wire.ChunkFrame) -> None:
        if self._state is not _State.CHUNKS:
            if self._state is _State.HEADER:
                raise _contract("missing header: the first frame is a chunk")
            raise _contract("data after the trailer: a chunk frame")
        context, layer, tensor, offset, claimed, frame, data_start, data_end = chunk
        kv = _WIRE_TO_KV.get(tensor)
        size = data_end - data_start
        if context < self._num_contexts and layer < self._num_layers and kv is not None:
            index = (context * self._num_layers + layer) * 2 + kv
            if (
                0 < size <= self._chunk_size
                and offset == self._next[index]
                and offset + size <= self._segments[index][1]
            ):
                checksum = self._copy_and_crc(frame, data_start, offset, size)
                if checksum != claimed:
                    raise TransportError(
                        Fault.CORRUPT,
                        f"CRC mismatch in the chunk at offset {offset} "
                        f"({self._where(context, layer, kv)}): data has {checksum:#010x}, "
                        f"frame says {claimed:#010x}",
                    )
                self._next[index] = offset + size
                self._starts.add(offset)
                self._pieces.append((offset, checksum, size))
                self._received_bytes += size
                if self.budget is not None:
                    self.budget.progress(self.upload, size)
                return
        raise self._chunk_violation(chunk)

    def _copy_and_crc(self, frame: bytes, data_start: int, offset: int, size: int) -> int:
        """Copy a chunk's data into place and return its CRC-32C, read back from the buffer.

        Copy first, then checksum the copy, a cache-sized piece at a time: the checksum then reads
        bytes the copy has just brought into cache instead of a second pass over memory. A chunk
        whose CRC does not match fails the stream, which releases the buffer it was copied into.
        """
        dest, flat = self._dest, self._flat_bytes
        assert dest is not None and flat is not None
        source = memoryview(frame)
        checksum = 0
        for pos in range(0, size, _CACHE_PIECE):
            n = min(_CACHE_PIECE, size - pos)
            at = offset + pos
            dest[at : at + n] = source[data_start + pos : data_start + pos + n]
            checksum = crc.extend(checksum, flat[at : at + n])
        return checksum

    def _where(self, context: int, layer: int, kv: int) -> str:
        assert self._layout is not None
        kind = _kind_name(self._layout.contexts[context].kind)
        return f"context {context} ({kind}) layer {layer} {'KV'[kv]}"

    def _chunk_violation(self, chunk: wire.ChunkFrame) -> TransportError:
        """The contract error of a chunk that the fast checks in `_on_chunk` turned away."""
        header, layout = self._header, self._layout
        assert header is not None and layout is not None
        if chunk.context >= len(layout.contexts):
            return _contract(f"chunk context {chunk.context} out of range ({len(layout.contexts)})")
        if chunk.layer >= layout.num_layers:
            return _contract(f"chunk layer {chunk.layer} out of range ({layout.num_layers})")
        kv = _WIRE_TO_KV.get(chunk.tensor)
        if kv is None:
            return _contract(f"chunk tensor {chunk.tensor} is neither K nor V")
        index = (chunk.context * layout.num_layers + chunk.layer) * 2 + kv
        start, end = self._segments[index]
        where = self._where(chunk.context, chunk.layer, kv)
        offset, size = chunk.offset, chunk.size
        if size == 0:
            return _contract(f"empty chunk at offset {offset} ({where})")
        if size > header.chunk_size:
            return _contract(
                f"chunk of {size} bytes exceeds the declared chunk size {header.chunk_size}"
            )
        if offset < start or offset + size > end:
            return _contract(
                f"chunk bytes [{offset}, {offset + size}) lie outside {where}, "
                f"which is [{start}, {end})"
            )
        expected = self._next[index]
        if offset > expected:
            return _contract(f"gap in {where}: expected offset {expected} next, got {offset}")
        if offset in self._starts:
            return _contract(f"duplicate chunk at offset {offset} ({where})")
        return _contract(
            f"chunk at offset {offset} overlaps bytes of {where} already received "
            f"(up to {expected})"
        )

    def _on_trailer(self, trailer: kv_pb2.KVTrailer) -> None:
        if self._state is _State.HEADER:
            raise _contract("missing header: the first frame is a trailer")
        if self._state is _State.DONE:
            raise _contract("data after the trailer: a second trailer")
        layout = self._layout
        assert layout is not None
        missing = [
            (i, end - self._next[i])
            for i, (_, end) in enumerate(self._segments)
            if self._next[i] != end
        ]
        if missing:
            first, short = missing[0]
            ci, rest = divmod(first, 2 * layout.num_layers)
            raise _contract(
                f"gap: the trailer came with {layout.total_bytes - self._received_bytes} payload "
                f"bytes missing; {len(missing)} of {len(self._segments)} tensors incomplete, the "
                f"first context {ci} layer {rest // 2} {'KV'[rest % 2]} ({short} bytes short)"
            )
        if trailer.chunk_count != len(self._pieces):
            raise _contract(
                f"trailer counts {trailer.chunk_count} chunks, {len(self._pieces)} arrived"
            )
        digest = crc.combine_all((c, n) for _, c, n in sorted(self._pieces))
        if digest != trailer.payload_crc32c:
            raise TransportError(
                Fault.CORRUPT,
                f"payload digest mismatch: received payload has CRC-32C {digest:#010x}, "
                f"trailer says {trailer.payload_crc32c:#010x}",
            )
        self._state = _State.DONE


def check_finite(cache: KVCache) -> None:
    """Raise TransportError (NOT_FINITE: INVALID_ARGUMENT) naming the first K or V tensor that
    holds NaN or Inf. One `aminmax` pass over the whole buffer finds either (NaN propagates to
    both ends, an Inf becomes one), many times faster than `isfinite(...).all()`
    (docs/benchmarks.md, "Figures behind code defaults"). Only a failed pass looks per tensor."""
    layout = cache.layout
    if cache.flat.numel() == 0 or _finite(cache.flat.view(layout.dtype)):
        return
    for ci, context in enumerate(cache.contexts):
        for kv, tensors in ((KEY, context.keys), (VALUE, context.values)):
            for layer, tensor in enumerate(tensors):
                if tensor.numel() and not _finite(tensor):
                    kind = _kind_name(layout.contexts[ci].kind)
                    raise TransportError(
                        Fault.NOT_FINITE,
                        f"the KV cache holds NaN or Inf values (first in context {ci} ({kind}) "
                        f"layer {layer} {'KV'[kv]}); its checksums match, so the sender "
                        f"computed them",
                    )


def _finite(values: torch.Tensor) -> bool:
    low, high = torch.aminmax(values)
    return bool(torch.isfinite(low) and torch.isfinite(high))


def _kind_name(kind: int) -> str:
    return kv_pb2.ContextKind.Name(kind).removeprefix("CONTEXT_KIND_").lower()
