"""KV cache -> serialized `DiffusionFrame`s: one header, CRC-checked chunks, one trailer.

Layers can be encoded as prefill produces them, so the transfer overlaps the prefill compute.
Each chunk is built with one copy (tensor memory -> the frame's bytes); frames are ready for a
gRPC call whose request serializer passes bytes through (see `transport.rpc`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from protos import GenerationParams, kv_pb2
from transport import crc, wire
from transport.layout import DTYPE_TO_WIRE, KEY, VALUE, ContextTensors, KVLayout
from transport.wire import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, PROTOCOL_VERSION

_WIRE_TENSOR = {KEY: kv_pb2.KV_TENSOR_KEY, VALUE: kv_pb2.KV_TENSOR_VALUE}


class KVEncoder:
    """Encodes one request's cache. Call `header()`, then `layer(l, ...)` once per layer in any
    order, then `trailer()`."""

    def __init__(
        self,
        layout: KVLayout,
        *,
        request_id: str,
        fingerprint: str,
        params: GenerationParams | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        if not 0 < chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK_SIZE}, got {chunk_size}")
        if layout.dtype not in DTYPE_TO_WIRE:
            raise ValueError(f"unsupported KV dtype {layout.dtype}")
        self.layout = layout
        self.chunk_size = chunk_size
        self._header = kv_pb2.KVHeader(
            protocol_version=PROTOCOL_VERSION,
            request_id=request_id,
            params=params,
            model_fingerprint=fingerprint,
            dtype=DTYPE_TO_WIRE[layout.dtype],
            num_layers=layout.num_layers,
            num_kv_heads=layout.num_kv_heads,
            head_dim=layout.head_dim,
            contexts=[
                kv_pb2.ContextInfo(
                    kind=c.kind,
                    num_tokens=c.num_tokens,
                    next_rope_position=c.next_rope_position,
                    prefix_of=c.prefix_of,
                )
                for c in layout.contexts
            ],
            total_bytes=layout.total_bytes,
            chunk_size=chunk_size,
        )
        self._pieces: list[tuple[int, int, int]] = []  # (offset, crc, length) of every chunk
        self._layers_done: set[int] = set()
        self.bytes_copied = 0  # payload bytes copied into frames: one copy per byte

    def header(self) -> bytes:
        return wire.header_frame(self._header)

    def layer(self, layer: int, pairs: Sequence[tuple[Tensor, Tensor]]) -> Iterator[bytes]:
        """Chunk frames of `layer`: `pairs` holds (K, V) for each context, in layout order."""
        if not 0 <= layer < self.layout.num_layers or layer in self._layers_done:
            raise ValueError(f"layer {layer} is out of range or was already encoded")
        if len(pairs) != len(self.layout.contexts):
            raise ValueError(f"expected K/V for {len(self.layout.contexts)} contexts")
        for ci, (k, v) in enumerate(pairs):
            self.layout.check_pair(ci, layer, k, v)
            source = self.layout.contexts[ci].prefix_of
            if source is not None:
                check_prefix(ci, layer, (k, v), pairs[source])
        self._layers_done.add(layer)
        for ci, (k, v) in enumerate(pairs):
            for kv, tensor in ((KEY, k), (VALUE, v)):
                yield from self._segment_frames(ci, layer, kv, tensor)

    def trailer(self) -> bytes:
        missing = sorted(set(range(self.layout.num_layers)) - self._layers_done)
        if missing:
            raise ValueError(f"layers {missing} were never encoded")
        pieces = sorted(self._pieces)
        digest = crc.combine_all((c, n) for _, c, n in pieces)
        return wire.trailer_frame(kv_pb2.KVTrailer(chunk_count=len(pieces), payload_crc32c=digest))

    def _segment_frames(self, context: int, layer: int, kv: int, tensor: Tensor) -> Iterator[bytes]:
        start, end = self.layout.segment(context, layer, kv)
        if start == end:
            return
        # uint8 numpy view of the tensor's memory: CRC and join read it in place, no staging copy.
        raw = tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy()
        for pos in range(0, end - start, self.chunk_size):
            piece = raw[pos : pos + self.chunk_size]
            checksum = crc.crc32c(piece)
            offset = start + pos
            self._pieces.append((offset, checksum, len(piece)))
            prefix = wire.chunk_prefix(
                context, layer, _WIRE_TENSOR[kv], offset, checksum, len(piece)
            )
            self.bytes_copied += len(piece)
            yield b"".join((prefix, piece))


def check_prefix(
    context: int, layer: int, pair: tuple[Tensor, Tensor], source: tuple[Tensor, Tensor]
) -> None:
    """A context sent as a prefix of another must be one: the receiver rebuilds it from the
    other's first tokens. A view into the other's memory passes at once; anything else is
    compared value by value."""
    for name, mine, theirs in zip("KV", pair, source, strict=True):
        head = theirs[: mine.shape[0]]
        same_memory = mine.data_ptr() == head.data_ptr() and mine.stride() == head.stride()
        if not (same_memory or torch.equal(mine, head)):
            raise ValueError(
                f"context {context} layer {layer} {name} is declared a prefix of another "
                "context but differs from its first tokens"
            )


def encode_layers(
    layout: KVLayout,
    layers: Iterable[Sequence[tuple[Tensor, Tensor]]],
    *,
    request_id: str,
    fingerprint: str,
    params: GenerationParams | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Iterator[bytes]:
    """All frames of one request; `layers` yields, layer by layer, (K, V) per context, so a
    prefill that yields each layer as it finishes it streams while it computes."""
    encoder = KVEncoder(
        layout, request_id=request_id, fingerprint=fingerprint, params=params, chunk_size=chunk_size
    )
    yield encoder.header()
    for index, pairs in enumerate(layers):
        yield from encoder.layer(index, pairs)
    yield encoder.trailer()


def encode_kv(
    contexts: Mapping[int, ContextTensors],
    *,
    request_id: str,
    fingerprint: str,
    params: GenerationParams | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Iterator[bytes]:
    """All frames of a cache that is already complete; `contexts` maps each context kind to its
    tensors, in payload order."""
    layout = KVLayout.of(contexts)
    layers = (
        [(c.keys[layer], c.values[layer]) for c in contexts.values()]
        for layer in range(layout.num_layers)
    )
    yield from encode_layers(
        layout,
        layers,
        request_id=request_id,
        fingerprint=fingerprint,
        params=params,
        chunk_size=chunk_size,
    )
