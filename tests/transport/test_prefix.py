"""A context sent as the start of another (`prefix_of`): no bytes of its own on the wire or in
the payload, views that are the other's first tokens, and a header that cannot point anywhere
else."""

from __future__ import annotations

import re

import pytest
import torch

from bagel.network.kv import Branch, ContextKV
from protos import DiffusionFrame
from transport import ContextSpec, FrameAssembler, KVLayout, TransportError, encode_layers
from transport.broadcast import layout_from_tensor, layout_to_tensor
from transport.encoder import check_prefix

from .factory import FINGERPRINT, make_contexts, raw, spec_for


def prefixed(cond_tokens: int = 9, shared: int = 6) -> tuple[dict[Branch, ContextKV], KVLayout]:
    """cond, uncond_text = cond's first `shared` tokens (as views), uncond_img apart."""
    contexts = make_contexts([cond_tokens, 0, 4], layers=3)
    cond = contexts[Branch.COND]
    contexts[Branch.UNCOND_TEXT] = ContextKV(
        [k[:shared] for k in cond.keys], [v[:shared] for v in cond.values], 2
    )
    base = KVLayout.of(contexts)
    specs = list(base.contexts)
    specs[1] = ContextSpec(specs[1].kind, shared, 2, prefix_of=0)
    return contexts, KVLayout(
        base.dtype, base.num_layers, base.num_kv_heads, base.head_dim, tuple(specs)
    )


def frames_of(contexts: dict[Branch, ContextKV], layout: KVLayout, chunk_size: int = 64):
    layers = (
        [(c.keys[i], c.values[i]) for c in contexts.values()] for i in range(layout.num_layers)
    )
    return list(
        encode_layers(
            layout, layers, request_id="p", fingerprint=FINGERPRINT, chunk_size=chunk_size
        )
    )


def assemble(frames, spec):
    with FrameAssembler(spec) as assembler:
        for frame in frames:
            assembler.feed(frame)
        return assembler.finish()


def test_a_prefix_context_takes_no_payload_and_reads_the_others_first_tokens():
    contexts, layout = prefixed()
    full = KVLayout.of(contexts)
    assert layout.total_bytes == full.total_bytes - full.tensor_bytes(1) * 2 * layout.num_layers
    flat = torch.arange(layout.total_bytes, dtype=torch.int64).to(torch.uint8)
    cond, text, _ = layout.views(flat)
    for layer in range(layout.num_layers):
        assert text.keys[layer].data_ptr() == cond.keys[layer].data_ptr()
        assert raw(text.values[layer]) == raw(cond.values[layer][:6])  # NaN bit patterns too


def test_it_round_trips_with_fewer_bytes_and_the_same_tensors():
    contexts, layout = prefixed()
    frames = frames_of(contexts, layout)
    without = frames_of(contexts, KVLayout.of(contexts))
    assert sum(map(len, frames)) < sum(map(len, without))
    received = assemble(frames, spec_for(contexts))
    assert received.cache.layout == layout
    for sent, got in zip(contexts.values(), received.cache.contexts, strict=True):
        assert got.next_rope_position == sent.next_rope_position
        for a, b in zip(sent.keys + sent.values, got.keys + got.values, strict=True):
            assert raw(a) == raw(b)


def test_the_encoder_refuses_a_declared_prefix_that_is_not_one():
    contexts, layout = prefixed()
    text = contexts[Branch.UNCOND_TEXT]
    text.keys[1] = text.keys[1].clone()
    text.keys[1][0, 0, 0] += 1
    with pytest.raises(ValueError, match="context 1 layer 1 K is declared a prefix"):
        frames_of(contexts, layout)
    text.keys[1] = contexts[Branch.COND].keys[1][:6].clone()  # an equal copy passes
    assert frames_of(contexts, layout)


@pytest.mark.parametrize(
    ("prefix_of", "tokens", "needle"),
    [
        (1, 6, "is not another context"),
        (7, 6, "is not another context"),
        (2, 5, "context 1 (5 tokens) is a prefix of context 2, which has only 4"),
        (0, 10, "context 1 (10 tokens) is a prefix of context 0, which has only 9"),
    ],
)
def test_a_header_whose_prefix_cannot_hold_is_refused(prefix_of, tokens, needle):
    contexts, layout = prefixed()
    frames = frames_of(contexts, layout)
    header = DiffusionFrame.FromString(frames[0])
    header.header.contexts[1].prefix_of = prefix_of
    header.header.contexts[1].num_tokens = tokens
    with pytest.raises(TransportError, match=re.escape(needle)):
        assemble([header.SerializeToString(), *frames[1:]], spec_for(contexts))


def test_a_prefix_of_a_prefix_is_refused():
    with pytest.raises(ValueError, match="itself a prefix"):
        KVLayout(
            torch.bfloat16,
            1,
            2,
            8,
            (
                ContextSpec(1, 5, 5),
                ContextSpec(2, 3, 1, prefix_of=0),
                ContextSpec(3, 2, 1, prefix_of=1),
            ),
        )


def test_the_rank_broadcast_header_carries_prefix_of():
    _, layout = prefixed()
    assert layout_from_tensor(layout_to_tensor(layout)) == layout
    header = layout_to_tensor(layout)
    header[7 + 4 + 3] = 1  # context 1 says it is a prefix of itself
    with pytest.raises(TransportError, match="broadcast header: context 1"):
        layout_from_tensor(header)


def test_a_view_into_the_others_memory_passes_without_comparing_values():
    """NaN equals nothing, not even itself: only the memory check can pass this prefix."""
    source = (torch.full((5, 2, 4), float("nan")), torch.full((5, 2, 4), float("nan")))
    check_prefix(1, 0, (source[0][:3], source[1][:3]), source)
    copy = (source[0][:3].clone(), source[1][:3].clone())
    with pytest.raises(ValueError) as info:
        check_prefix(1, 0, copy, source)
    assert str(info.value) == (
        "context 1 layer 0 K is declared a prefix of another context but differs from its first "
        "tokens"
    )
    strided = source[0].as_strided((3, 2, 4), (4, 8, 1))  # same first address, other strides
    with pytest.raises(ValueError, match="^context 2 layer 3 K is declared"):
        check_prefix(2, 3, (strided, source[1][:3]), source)
