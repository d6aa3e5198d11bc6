"""The edges of the transport's building blocks, each with its exact refusal: the encoder's layer
order and dtype, `KVLayout.of` and `views`, the chunk parser's defaults and unknown fields, the
budget's exact-fit eviction and its message, and the idle timeouts of `receive_kv`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import torch

from bagel.network.kv import Branch, ContextKV
from protos import DiffusionFrame, KVChunk
from transport import (
    FrameAssembler,
    KVLayout,
    TransportError,
    UploadBudget,
    receive_kv,
    status_code,
)
from transport.encoder import KVEncoder
from transport.rpc import _shorter
from transport.wire import _parse_any, _tag

from .factory import FINGERPRINT, make_contexts
from .test_admission import Clock, evictions
from .test_faults import SPEC


def encoder_of(contexts: dict[Branch, ContextKV]) -> tuple[KVEncoder, list]:
    layout = KVLayout.of(contexts)
    encoder = KVEncoder(layout, request_id="r", fingerprint=FINGERPRINT)
    pairs = [
        [(c.keys[i], c.values[i]) for c in contexts.values()] for i in range(layout.num_layers)
    ]
    return encoder, pairs


def test_each_layer_is_encoded_once_and_only_layers_that_exist():
    encoder, pairs = encoder_of(make_contexts((3, 2), layers=2))
    for layer in (2, -1):
        with pytest.raises(ValueError) as info:
            list(encoder.layer(layer, pairs[0]))
        assert str(info.value) == f"layer {layer} is out of range or was already encoded"
    assert list(encoder.layer(0, pairs[0]))
    with pytest.raises(ValueError, match="^layer 0 is out of range or was already encoded$"):
        list(encoder.layer(0, pairs[0]))
    with pytest.raises(ValueError) as info:
        list(encoder.layer(1, pairs[1][:1]))
    assert str(info.value) == "expected K/V for 2 contexts"


def test_an_encoder_refuses_a_dtype_the_wire_cannot_name():
    layout = KVLayout.of(make_contexts((3,), dtype=torch.float64, layers=1))
    with pytest.raises(ValueError) as info:
        KVEncoder(layout, request_id="r", fingerprint=FINGERPRINT)
    assert str(info.value) == "unsupported KV dtype torch.float64"


def test_kv_layout_of_names_what_is_missing_or_wrong():
    with pytest.raises(ValueError, match="^a KV cache needs at least one context$"):
        KVLayout.of({})
    contexts = make_contexts((3,), layers=1)
    with pytest.raises(ValueError) as info:
        KVLayout.of({7: contexts[Branch.COND], 9: contexts[Branch.COND]})
    assert str(info.value) == "unknown context kinds [7, 9]"
    empty = ContextKV(keys=[], values=[], next_rope_position=0)
    with pytest.raises(ValueError) as info:
        KVLayout.of({Branch.COND: empty})
    assert str(info.value) == "a KV cache needs at least one layer"
    two = make_contexts((3, 2), layers=2)
    text = two[Branch.UNCOND_TEXT]
    short = ContextKV(keys=text.keys, values=text.values[:1], next_rope_position=2)
    with pytest.raises(ValueError) as info:
        KVLayout.of({Branch.COND: two[Branch.COND], Branch.UNCOND_TEXT: short})
    assert str(info.value) == "context 1 (kind 2) does not have 2 layers of K and V"
    wrong = ContextKV(
        keys=text.keys, values=[text.values[0], text.values[1][:1]], next_rope_position=2
    )
    with pytest.raises(ValueError) as info:
        KVLayout.of({Branch.COND: two[Branch.COND], Branch.UNCOND_TEXT: wrong})
    assert str(info.value) == (
        "context 1 layer 1 V: expected [2, 2, 8] torch.bfloat16, got [1, 2, 8] torch.bfloat16"
    )


def test_a_context_without_layers_beside_others_has_no_tokens():
    contexts = make_contexts((3,), layers=1)
    contexts[Branch.UNCOND_TEXT] = ContextKV(keys=[], values=[], next_rope_position=5)
    with pytest.raises(ValueError, match="does not have 1 layers"):
        KVLayout.of(contexts)


def test_views_refuse_any_flat_buffer_but_uint8_of_the_total_size():
    layout = KVLayout.of(make_contexts((3,), layers=1))
    total = layout.total_bytes
    message = f"^flat buffer must be uint8 \\[{total}\\]$"
    for bad in (
        torch.zeros(total // 2, dtype=torch.int16),
        torch.zeros(2, total // 2, dtype=torch.uint8),
        torch.zeros(total + 1, dtype=torch.uint8),
    ):
        with pytest.raises(ValueError, match=message):
            layout.views(bad)


def chunk(*fields: bytes) -> bytes:
    body = b"".join(fields)
    return _tag(2, 2) + bytes([len(body)]) + body


def test_a_chunks_unset_fields_are_zero_and_unknown_fields_are_skipped():
    frame = DiffusionFrame(chunk=KVChunk(context=1, data=b"abc")).SerializeToString()
    parsed = _parse_any(frame)
    assert (parsed.context, parsed.layer, parsed.tensor, parsed.offset, parsed.crc32c) == (
        1,
        0,
        0,
        0,
        0,
    )
    unknown_first = chunk(_tag(9, 0) + b"\x05", _tag(2, 0) + b"\x03", _tag(6, 2) + b"\x02hi")
    parsed = _parse_any(unknown_first)
    assert (parsed.layer, bytes(parsed.frame[parsed.data_start : parsed.data_end])) == (3, b"hi")


def test_a_chunk_field_of_the_wrong_wire_type_is_named():
    with pytest.raises(TransportError) as info:
        _parse_any(chunk(_tag(2, 2) + b"\x00"))
    assert info.value.message.endswith("KVChunk field 2 has wire type 2")


def test_an_eviction_frees_exactly_the_room_needed_stalest_first_and_counts_every_eviction():
    clock = Clock()
    budget = UploadBudget(100, stall_s=1.0, min_rate=2 * (1 << 20), clock=clock)
    oldest = budget.reserve(50)
    clock.now += 0.5
    younger = budget.reserve(50)
    seen = {"oldest": evictions(oldest), "younger": evictions(younger)}
    clock.now += 1.6  # both silent past the stall time: oldest 2.1 s, younger 1.6 s
    budget.reserve(50)  # exactly the oldest's room
    assert [len(seen[n]) for n in ("oldest", "younger")] == [1, 0] and budget.evicted == 1
    assert seen["oldest"][0].message == (
        "upload evicted after 2.1 s without progress (0 of 50 payload bytes arrived; uploads "
        "must send a frame every 1 s and 2 MiB/s on average while others need their room): retry"
    )
    budget.reserve(50)
    assert len(seen["younger"]) == 1 and budget.evicted == 2


def test_the_shorter_of_two_timeouts_none_meaning_no_limit():
    assert _shorter(None, None) is None
    assert _shorter(None, 2.0) == 2.0
    assert _shorter(3.0, None) == 3.0
    assert _shorter(3.0, 2.0) == 2.0 and _shorter(1.0, 2.0) == 1.0


async def _silent() -> AsyncIterator[bytes]:
    await asyncio.sleep(3600)
    yield b""


def test_an_idle_timeout_shorter_than_the_first_frame_timeout_ends_the_wait_for_the_header():
    assembler = FrameAssembler(SPEC, budget=UploadBudget(3000))
    started = time.monotonic()
    with pytest.raises(TransportError) as info:
        asyncio.run(
            asyncio.wait_for(
                receive_kv(_silent(), assembler, idle_timeout_s=0.2, first_frame_timeout_s=30),
                5.0,
            )
        )
    assert time.monotonic() - started < 3.0
    assert status_code(info.value) is grpc.StatusCode.DEADLINE_EXCEEDED
    assert info.value.message == (
        "no KV header within 0.2 s of the call's start: the upload was abandoned"
    )
