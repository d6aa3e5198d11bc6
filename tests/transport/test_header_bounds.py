"""Every bound of the KV header, at both ends and on both sides of each: the value at a bound is
accepted and the value just past it refused, by the sender where it checks and by the receiver
(chunk size 1..MAX_CHUNK_SIZE inclusive, a chunk at most chunk_size bytes, 1..MAX_CONTEXTS
contexts, `prefix_of` naming another context with at least as many tokens, the prefill's token
limit; the payload limit is pinned in test_faults.py)."""

from __future__ import annotations

import re

import pytest
import torch

from bagel.network.kv import Branch
from prefill_service.prefill import PlannedKV, check_token_counts
from protos import DiffusionFrame
from serving.errors import InvalidParams
from transport import ContextSpec, FrameAssembler, KVLayout, TransportError, encode_kv
from transport.layout import MAX_CONTEXTS
from transport.wire import MAX_CHUNK_SIZE

from .factory import FINGERPRINT, assert_same_cache, make_contexts, spec_for
from .test_prefix import frames_of, prefixed

# fp32, 1 layer, 1 head x 2 dims: 8 bytes a token, so chunk sizes stay small.
CONTEXTS = make_contexts([3, 2, 1], dtype=torch.float32, layers=1, heads=1, head_dim=2)
SPEC = spec_for(CONTEXTS)


def frames(contexts=CONTEXTS, chunk_size: int = 8) -> list[bytes]:
    return list(encode_kv(contexts, request_id="b", fingerprint=FINGERPRINT, chunk_size=chunk_size))


def assemble(fs: list[bytes], spec=SPEC):
    with FrameAssembler(spec) as assembler:
        for frame in fs:
            assembler.feed(frame)
        return assembler.finish()


def with_header(fs: list[bytes], change) -> list[bytes]:
    message = DiffusionFrame.FromString(fs[0])
    change(message.header)
    return [message.SerializeToString(), *fs[1:]]


def refused(fs: list[bytes], needle: str, spec=SPEC) -> None:
    with pytest.raises(TransportError, match=re.escape(needle)):
        assemble(fs, spec)


# ---- chunk size ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, MAX_CHUNK_SIZE])
def test_a_chunk_size_at_either_end_of_its_range_is_sent_and_received(chunk_size):
    received = assemble(frames(chunk_size=chunk_size))
    assert_same_cache(CONTEXTS, received.cache.contexts)


@pytest.mark.parametrize("chunk_size", [0, MAX_CHUNK_SIZE + 1])
def test_a_chunk_size_just_outside_its_range_is_refused_by_sender_and_receiver(chunk_size):
    with pytest.raises(ValueError, match=f"chunk_size must be in 1..{MAX_CHUNK_SIZE}"):
        frames(chunk_size=chunk_size)
    fs = with_header(frames(), lambda h: setattr(h, "chunk_size", chunk_size))
    refused(fs, f"chunk size {chunk_size} is outside 1..{MAX_CHUNK_SIZE}")


def test_a_chunk_of_exactly_the_chunk_size_is_accepted_and_one_byte_more_refused():
    fs = frames(chunk_size=24)  # a cond tensor is 24 bytes: one chunk of exactly 24
    first = DiffusionFrame.FromString(fs[1]).chunk
    assert len(first.data) == 24
    assemble(fs)
    refused(with_header(fs, lambda h: setattr(h, "chunk_size", 23)), "chunk")


# ---- context count ------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, MAX_CONTEXTS])
def test_one_context_and_the_most_contexts_are_received(count):
    contexts = dict(list(CONTEXTS.items())[:count])
    received = assemble(frames(contexts))
    assert_same_cache(contexts, received.cache.contexts)


def test_no_context_and_one_too_many_are_refused():
    refused(with_header(frames(), lambda h: h.ClearField("contexts")), "got 0")
    too_many = with_header(frames(), lambda h: h.contexts.add().CopyFrom(h.contexts[0]))
    refused(too_many, f"a header lists 1 to {MAX_CONTEXTS} contexts, got {MAX_CONTEXTS + 1}")
    with pytest.raises(ValueError, match="a KV cache needs at least one context"):
        frames({})  # the sender cannot send none either


# ---- prefix_of ----------------------------------------------------------------------------


def _prefix_header(prefix_of: int, tokens: int):
    contexts, layout = prefixed()  # 3 contexts: cond 9 tokens, text = cond's first 6, img 4
    fs = frames_of(contexts, layout)

    def change(h):
        h.contexts[1].prefix_of = prefix_of
        h.contexts[1].num_tokens = tokens

    return contexts, with_header(fs, change)


@pytest.mark.parametrize(("prefix_of", "tokens"), [(0, 9), (2, 4)])
def test_a_prefix_of_the_first_or_the_last_other_context_with_as_many_tokens_is_accepted(
    prefix_of, tokens
):
    contexts, fs = _prefix_header(prefix_of, tokens)
    received = assemble(fs, spec_for(contexts)).cache.contexts
    source = received[prefix_of]
    assert received[1].num_tokens == tokens
    assert torch.equal(received[1].keys[0], source.keys[0][:tokens])


@pytest.mark.parametrize(
    ("prefix_of", "tokens", "needle"),
    [
        (3, 4, "context 1 is a prefix of context 3, which is not another context"),
        (1, 4, "context 1 is a prefix of context 1, which is not another context"),
        (0, 10, "context 1 (10 tokens) is a prefix of context 0, which has only 9"),
        (2, 5, "context 1 (5 tokens) is a prefix of context 2, which has only 4"),
    ],
)
def test_a_prefix_just_past_the_contexts_or_their_tokens_is_refused(prefix_of, tokens, needle):
    contexts, fs = _prefix_header(prefix_of, tokens)
    refused(fs, needle, spec_for(contexts))
    with pytest.raises(ValueError, match=re.escape(needle)):  # and the sender cannot build it
        specs = [ContextSpec(1, 9, 9), ContextSpec(2, tokens, 2, prefix_of), ContextSpec(3, 4, 4)]
        KVLayout(torch.float32, 1, 1, 2, tuple(specs))


# ---- token counts (the prefill's limit) ---------------------------------------------------


def _planned(*counts: int, text: tuple[int, ...] | None = None) -> PlannedKV:
    kinds = (Branch.COND, Branch.UNCOND_TEXT, Branch.UNCOND_IMG)
    specs = tuple(ContextSpec(int(k), n, n) for k, n in zip(kinds, counts, strict=False))
    return PlannedKV(specs, lambda: iter(()), text)


def test_contexts_of_exactly_the_token_limit_pass_and_one_more_token_is_refused():
    check_token_counts(_planned(16, 16), limit=16)
    with pytest.raises(InvalidParams, match="prompt is 17 tokens long with its framing"):
        check_token_counts(_planned(17, 3), limit=16)
    with pytest.raises(InvalidParams, match="negative_prompt is 17 tokens long"):
        check_token_counts(_planned(3, 17), limit=16)


def test_an_image_s_tokens_do_not_count_against_the_prompt_limit():
    # An edit's contexts hold the image's tokens too; only the text tokens are limited.
    check_token_counts(_planned(400, 300, 16, text=(16, 16, 16)), limit=16)
    with pytest.raises(InvalidParams, match="prompt is 17 tokens"):
        check_token_counts(_planned(400, 300, 16, text=(17, 16, 16)), limit=16)
