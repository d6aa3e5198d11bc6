"""Encoder -> frames -> assembler gives back exactly the bytes that were sent."""

from __future__ import annotations

import random

import pytest
import torch

from bagel.network.kv import Branch, ContextKV
from protos import DiffusionFrame, GenerationParams
from transport import (
    BufferPool,
    FrameAssembler,
    KVEncoder,
    KVLayout,
    encode_kv,
    encode_layers,
)

from .factory import FINGERPRINT, RecordingBuffers, assert_same_cache, make_contexts, spec_for

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def assemble(frames, spec, **kwargs):
    with FrameAssembler(spec, **kwargs) as assembler:
        for frame in frames:
            assembler.feed(frame)
        return assembler.finish()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", range(4))
def test_round_trip_is_exact_for_random_sizes_and_chunkings(dtype, seed):
    rng = random.Random(seed)
    tokens = [rng.randint(1, 40), 0, rng.randint(0, 40)][: rng.randint(2, 3)]
    contexts = make_contexts(tokens, dtype=dtype, layers=rng.randint(1, 4), seed=seed)
    contexts[Branch.COND].keys[0][0, 0, 0] = float("nan")  # bit patterns travel, not values
    chunk_size = rng.choice([1, 7, 64, 1000, 1 << 20])
    params = GenerationParams(height=512, width=768, seed=seed)
    frames = list(
        encode_kv(
            contexts,
            request_id=f"r{seed}",
            fingerprint=FINGERPRINT,
            params=params,
            chunk_size=chunk_size,
        )
    )
    received = assemble(frames, spec_for(contexts))
    assert received.request_id == f"r{seed}"
    assert received.params == params
    assert received.cache.layout == KVLayout.of(contexts)
    assert_same_cache(contexts, received.cache.contexts)


def test_zero_token_context_round_trips_as_empty_tensors():
    contexts = make_contexts([5, 0, 3])
    received = assemble(
        encode_kv(contexts, request_id="z", fingerprint=FINGERPRINT), spec_for(contexts)
    )
    empty = received.cache.context(Branch.UNCOND_TEXT)
    assert empty is not None and all(t.shape == (0, 2, 8) for t in empty.keys + empty.values)
    assert_same_cache(contexts, received.cache.contexts)


def test_cache_of_only_empty_contexts_round_trips():
    contexts = make_contexts([0, 0])
    received = assemble(
        encode_kv(contexts, request_id="e", fingerprint=FINGERPRINT), spec_for(contexts)
    )
    assert received.cache.layout.total_bytes == 0
    assert_same_cache(contexts, received.cache.contexts)


def test_layers_encoded_out_of_order_as_prefill_produces_them_still_round_trip():
    contexts = make_contexts([9, 4, 6], dtype=torch.float16, layers=5)
    encoder = KVEncoder(
        KVLayout.of(contexts), request_id="o", fingerprint=FINGERPRINT, chunk_size=50
    )
    frames = [encoder.header()]
    for layer in [3, 0, 4, 1, 2]:
        frames += encoder.layer(
            layer, [(c.keys[layer], c.values[layer]) for c in contexts.values()]
        )
    frames.append(encoder.trailer())
    assert_same_cache(contexts, assemble(frames, spec_for(contexts)).cache.contexts)


def test_encode_layers_streams_each_layer_before_the_next_is_produced():
    contexts = make_contexts([4, 2], layers=3)
    produced = []

    def layers():
        for layer in range(3):
            produced.append(layer)
            yield [(c.keys[layer], c.values[layer]) for c in contexts.values()]

    frames = encode_layers(KVLayout.of(contexts), layers(), request_id="s", fingerprint=FINGERPRINT)
    next(frames)  # header
    next(frames)  # first chunk of layer 0
    assert produced == [0]


def test_received_tensors_are_views_of_one_flat_buffer():
    contexts = make_contexts([6, 3, 2], layers=2)
    received = assemble(
        encode_kv(contexts, request_id="v", fingerprint=FINGERPRINT), spec_for(contexts)
    )
    flat = received.cache.flat
    base = flat.untyped_storage().data_ptr()
    for ctx in received.cache.contexts:
        for t in ctx.keys + ctx.values:
            assert t.untyped_storage().data_ptr() == base  # no second copy anywhere
    assert flat.numel() == received.cache.layout.total_bytes


def test_every_frame_is_a_valid_protobuf_diffusion_frame():
    contexts = make_contexts([3, 1], layers=2)
    frames = list(encode_kv(contexts, request_id="p", fingerprint=FINGERPRINT, chunk_size=20))
    kinds = [DiffusionFrame.FromString(f).WhichOneof("frame") for f in frames]
    assert kinds[0] == "header" and kinds[-1] == "trailer"
    assert set(kinds[1:-1]) == {"chunk"}
    chunk = DiffusionFrame.FromString(frames[1]).chunk
    assert (chunk.context, chunk.layer, chunk.offset, len(chunk.data)) == (0, 0, 0, 20)


def test_frames_from_a_plain_protobuf_encoder_are_accepted():
    """Another implementation may order fields differently; data need not come last."""
    contexts = make_contexts([3, 2], layers=2, dtype=torch.float32)
    frames = [
        _reorder_data_first(f) if DiffusionFrame.FromString(f).WhichOneof("frame") == "chunk" else f
        for f in encode_kv(contexts, request_id="x", fingerprint=FINGERPRINT, chunk_size=16)
    ]
    assert_same_cache(contexts, assemble(frames, spec_for(contexts)).cache.contexts)


def _reorder_data_first(frame: bytes) -> bytes:
    """Re-encode a chunk frame with its `data` field before the scalar fields."""
    c = DiffusionFrame.FromString(frame).chunk
    data_only = type(c)(data=c.data).SerializeToString()
    scalars = type(c)(
        context=c.context, layer=c.layer, tensor=c.tensor, offset=c.offset, crc32c=c.crc32c
    )
    inner = data_only + scalars.SerializeToString()
    assert type(c).FromString(inner) == c
    return b"\x12" + _varint(len(inner)) + inner


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes([*out, n])


def test_unknown_fields_are_skipped_as_protobuf_does():
    contexts = make_contexts([2], layers=1, dtype=torch.float32)
    frames = list(encode_kv(contexts, request_id="u", fingerprint=FINGERPRINT))
    unknown = b"\xf8\x01\x07"  # field 31, varint 7: a field a newer sender might add
    frames[1] = frames[1] + unknown
    assert_same_cache(contexts, assemble(frames, spec_for(contexts)).cache.contexts)


def test_pool_buffer_is_reused_after_release():
    contexts = make_contexts([8, 2], layers=2)
    spec = spec_for(contexts)
    pool = BufferPool()
    first = assemble(
        encode_kv(contexts, request_id="a", fingerprint=FINGERPRINT), spec, buffers=pool
    )
    pointer = first.cache.flat.data_ptr()
    first.cache.release()
    assert pool.idle_bytes >= first.cache.layout.total_bytes
    second = assemble(
        encode_kv(contexts, request_id="b", fingerprint=FINGERPRINT), spec, buffers=pool
    )
    assert second.cache.flat.data_ptr() == pointer
    assert_same_cache(contexts, second.cache.contexts)


def test_finished_cache_owns_the_buffer_and_gives_it_back_on_release():
    contexts = make_contexts([4])
    buffers = RecordingBuffers()
    with FrameAssembler(spec_for(contexts), buffers=buffers) as assembler:
        for frame in encode_kv(contexts, request_id="o", fingerprint=FINGERPRINT):
            assembler.feed(frame)
        received = assembler.finish()
        assert not assembler.holds_buffer
    assert len(buffers.outstanding) == 1  # closing the assembler leaves the result alone
    received.cache.release()
    assert buffers.outstanding == {}
    assert received.cache.contexts == []


def test_encoder_rejects_tensors_that_do_not_match_the_layout():
    contexts = make_contexts([3, 2], layers=2)
    encoder = KVEncoder(KVLayout.of(contexts), request_id="m", fingerprint=FINGERPRINT)
    bad = torch.zeros(3, 2, 9, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="context 0 layer 0 K"):
        list(
            encoder.layer(
                0,
                [
                    (bad, contexts[Branch.COND].values[0]),
                    (contexts[Branch.UNCOND_TEXT].keys[0], contexts[Branch.UNCOND_TEXT].values[0]),
                ],
            )
        )
    with pytest.raises(ValueError, match="never encoded"):
        encoder.trailer()


def test_layout_of_rejects_ragged_layers():
    contexts = make_contexts([3, 2], layers=2)
    text = contexts[Branch.UNCOND_TEXT]
    contexts[Branch.UNCOND_TEXT] = ContextKV(text.keys[:1], text.values[:1], 0)
    with pytest.raises(ValueError, match="does not have 2 layers"):
        KVLayout.of(contexts)


def test_the_encoder_counts_every_payload_byte_it_copies_once():
    contexts = make_contexts([5, 0, 3], dtype=torch.float32, layers=2)
    layout = KVLayout.of(contexts)
    encoder = KVEncoder(layout, request_id="r", fingerprint=FINGERPRINT, chunk_size=64)
    for layer in range(layout.num_layers):
        list(encoder.layer(layer, [(c.keys[layer], c.values[layer]) for c in contexts.values()]))
    assert encoder.bytes_copied == layout.total_bytes == 2048
