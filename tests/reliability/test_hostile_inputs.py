"""Hostile inputs to both services, as one table of cases run through one test: each must end with
its status code and a message naming the fault, and the correct request that follows it must
come back equal to the in-process reference.

The parameter cases are derived from the request schema (`serving.params.walk` and each field's
`bounds`), so the table grows with it; the KV-stream cases tamper with a real frame stream sent
straight to the diffusion service, as a foreign prefill engine could."""

from __future__ import annotations

import dataclasses
import io
import math
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from bagel.network.kv import Branch, ContextKV
from bagel.pipeline import Pipeline
from protos import (
    DIFFUSION_SERVICE,
    PREFILL_SERVICE,
    DiffusionFrame,
    GenerateEvent,
    GenerateRequest,
    PrefillStub,
    kv_pb2,
    params_pb2,
)
from protos.options import MAX_MESSAGE_BYTES, channel_options
from serving.codecs import FloatCodec, IntCodec
from serving.params import CACHE_SPEC, GenerationParams, walk
from tests.reliability.conftest import (
    PROMPT,
    SMALL,
    ServicePair,
    Tally,
    kv_bytes,
    pixels,
)
from transport.crc import crc32c
from transport.encoder import encode_kv
from transport.rpc import diffusion_generate

CHUNK = 256  # several chunks per tensor of the tiny model's KV
IDLE_TIMEOUT_S = 1.5
MAX_KV_BYTES = 1 << 20
MAX_PROMPT_TOKENS = 64
FOLLOW_UP_SEED = 7
INVALID, DATA_LOSS = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DATA_LOSS
EXHAUSTED, DEADLINE = grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED
BAD_ID = "request_id must be 1 to 128 printable ASCII characters"


@dataclass
class Target:
    """What a case sends to: both addresses and the KV cache of PROMPT for the model served."""

    prefill: str
    diffusion: str
    contexts: dict[Branch, ContextKV]
    fingerprint: str


@dataclass(frozen=True)
class Case:
    name: str
    service: str  # "prefill" or "diffusion": where the case and the request after it go
    send: Callable[[Target], None]  # raises grpc.RpcError
    code: grpc.StatusCode
    fragment: str  # a part of the status message that names the fault


# ---- how cases are sent ----------------------------------------------------------------------


def good_params(**changes) -> params_pb2.GenerationParams:
    return dataclasses.replace(SMALL, seed=FOLLOW_UP_SEED, **changes).to_proto()


def ask_prefill(
    request: GenerateRequest, timeout: float = 30.0
) -> Callable[[Target], list[GenerateEvent]]:
    def send(target: Target) -> list[GenerateEvent]:
        with grpc.insecure_channel(target.prefill, options=channel_options()) as channel:
            return list(PrefillStub(channel).Generate(request, timeout=timeout))

    return send


def ask_prefill_raw(data: bytes) -> Callable[[Target], None]:
    """`data` as the request's bytes, whatever they are."""

    def send(target: Target) -> None:
        options = channel_options(max_message_bytes=-1)  # the server must be the one refusing
        with grpc.insecure_channel(target.prefill, options=options) as channel:
            call = channel.unary_stream(
                f"/{PREFILL_SERVICE}/Generate",
                request_serializer=None,
                response_deserializer=GenerateEvent.FromString,
            )
            list(call(data, timeout=30))

    return send


def upload(
    frames: Callable[[Target], Iterable[bytes]], timeout: float = 30.0
) -> Callable[[Target], list[GenerateEvent]]:
    def send(target: Target) -> list[GenerateEvent]:
        options = channel_options(max_message_bytes=-1)
        with grpc.insecure_channel(target.diffusion, options=options) as channel:
            return list(diffusion_generate(channel)(iter(frames(target)), timeout=timeout))

    return send


def good_frames(
    target: Target,
    params: params_pb2.GenerationParams | None = None,
    request_id: str = "hostile",
    contexts: dict[Branch, ContextKV] | None = None,
) -> list[bytes]:
    return list(
        encode_kv(
            target.contexts if contexts is None else contexts,
            request_id=request_id,
            fingerprint=target.fingerprint,
            params=good_params() if params is None else params,
            chunk_size=CHUNK,
        )
    )


# ---- parameters: derived from the schema, sent to both services --------------------------------


def out_of_range(path: str, meta: dict) -> Iterator[tuple[str, float]]:
    """(label, value) just outside each end of the field's bounds, and NaN for a float."""
    bounds, codec = meta["bounds"], meta["codec"]
    step = 1 if isinstance(codec, IntCodec) else 0.5
    below = bounds.lo if bounds.lo_open else bounds.lo - step
    above = bounds.hi if bounds.hi_open else bounds.hi + step
    kind = int if isinstance(codec, IntCodec) else float
    yield "below", kind(below)
    yield "above", kind(above)
    if isinstance(codec, FloatCodec):
        yield "nan", math.nan


def bounded_fields() -> Iterator[tuple[str | None, str, dict]]:
    """(cache policy member or None, dotted path, metadata) of every field with bounds."""
    seen = set()
    for policy in (None, *(cls() for cls in CACHE_SPEC.policies.values())):
        member = None if policy is None else CACHE_SPEC.names[type(policy)]
        for path, _, meta in walk(GenerationParams(cache=policy)):
            if meta["bounds"] is not None and (member, path) not in seen:
                seen.add((member, path))
                if policy is None or path.startswith("cache."):
                    yield member, path, meta


def params_with(member: str | None, path: str, value) -> params_pb2.GenerationParams | None:
    """Good params with one field set to `value` on the wire; None where the wire type cannot
    hold it (a negative uint32, an int64 beyond 2**63 - 1)."""
    msg = good_params()
    holder = msg if member is None else getattr(msg.cache, member)
    try:
        setattr(holder, path.rpartition(".")[2], value)
    except (ValueError, TypeError):
        return None
    return msg


def changed(change: Callable[[params_pb2.GenerationParams], None]) -> params_pb2.GenerationParams:
    msg = good_params()
    change(msg)
    return msg


def interval(lo: float, hi: float) -> Callable[[params_pb2.GenerationParams], None]:
    def change(msg: params_pb2.GenerationParams) -> None:
        msg.cfg_interval.lo, msg.cfg_interval.hi = lo, hi

    return change


def set_fields(
    holder: str | None = None, **values
) -> Callable[[params_pb2.GenerationParams], None]:
    def change(msg: params_pb2.GenerationParams) -> None:
        target = msg if holder is None else getattr(msg.cache, holder)
        for name, value in values.items():
            setattr(target, name, value)

    return change


def param_faults() -> Iterator[tuple[str, params_pb2.GenerationParams, str]]:
    """(name, params on the wire, message fragment) of every bad parameter set."""
    for member, path, meta in bounded_fields():
        for label, value in out_of_range(path, meta):
            msg = params_with(member, path, value)
            if msg is not None:
                yield f"{member or 'params'}.{path.rpartition('.')[2]}-{label}", msg, f"{path}="
    for name, change, fragment in (
        ("height-not-multiple", set_fields(height=40), "height=40 must be a positive multiple"),
        ("height-zero", set_fields(height=0), "height=0 must be a positive multiple"),
        ("width-too-large", set_fields(width=1040), "width=1040 must be a positive multiple"),
        ("width-not-multiple", set_fields(width=24), "width=24 must be a positive multiple"),
        ("renorm-enum", set_fields(cfg_renorm_type=9), "cfg_renorm_type=9 is not a known value"),
        ("output-enum", set_fields(output_format=7), "output_format=7 is not a known value"),
        ("interval-reversed", interval(0.9, 0.1), "must satisfy lo <= hi"),
        ("interval-outside", interval(-0.1, 1.0), "both ends must be in [0, 1]"),
        ("interval-nan", interval(0.0, math.nan), "cfg_interval=nan must be finite"),
        (
            "dbcache-no-block-left",
            set_fields("db_cache", fn_compute_blocks=3, bn_compute_blocks=1),
            "leaves none of the model's 4 blocks to cache",
        ),
        (
            "negative-prompt-chars",
            set_fields(negative_prompt="n" * 16_385),
            "negative_prompt is longer than 16384 characters",
        ),
    ):
        yield name, changed(change), fragment


BAD_IDS = {
    "newline": "forged\n2026-11-30 INFO prefill_service: [admin] done",
    "100kb": "x\x1b[2J" + "y" * 100_000,
    "non-ascii": "zürich-1",
    "129-chars": "r" * 129,
}


def both_services() -> Iterator[Case]:
    for name, params, fragment in param_faults():
        request = GenerateRequest(prompt=PROMPT, params=params)
        yield Case(f"prefill/{name}", "prefill", ask_prefill(request), INVALID, fragment)
        frames = _with_params(params)
        yield Case(f"diffusion/{name}", "diffusion", upload(frames), INVALID, fragment)
    for name, request_id in BAD_IDS.items():
        request = GenerateRequest(prompt=PROMPT, params=good_params(), request_id=request_id)
        yield Case(f"prefill/request-id-{name}", "prefill", ask_prefill(request), INVALID, BAD_ID)
        frames = _with_id(request_id)
        yield Case(f"diffusion/request-id-{name}", "diffusion", upload(frames), INVALID, BAD_ID)
    request = GenerateRequest(prompt=PROMPT, params=good_params())
    yield Case(
        "prefill/deadline-1ms",
        "prefill",
        ask_prefill(request, 0.001),
        DEADLINE,
        "deadline exceeded",
    )
    yield Case("diffusion/deadline-1ms", "diffusion", upload(good_frames, 0.001), DEADLINE, "deadline exceeded")  # fmt: skip
    for service, path in (("prefill", PREFILL_SERVICE), ("diffusion", DIFFUSION_SERVICE)):
        yield Case(
            f"{service}/unknown-method",
            service,
            unknown_method(path),
            grpc.StatusCode.UNIMPLEMENTED,
            "Method not found",
        )


def _with_params(params: params_pb2.GenerationParams) -> Callable[[Target], list[bytes]]:
    return lambda target: good_frames(target, params=params)


def _with_id(request_id: str) -> Callable[[Target], list[bytes]]:
    return lambda target: good_frames(target, request_id=request_id)


def unknown_method(service: str) -> Callable[[Target], None]:
    def send(target: Target) -> None:
        address = target.prefill if service == PREFILL_SERVICE else target.diffusion
        with grpc.insecure_channel(address) as channel:
            channel.unary_unary(f"/{service}/Delete", request_serializer=None)(b"", timeout=10)

    return send


# ---- the prefill service's own checks ------------------------------------------------------


def prefill_only() -> Iterator[Case]:
    def prompt(text: str, negative: str = "") -> Callable[[Target], list[GenerateEvent]]:
        return ask_prefill(
            GenerateRequest(prompt=text, params=good_params(negative_prompt=negative))
        )

    limit = f"tokens long with its framing; the limit is {MAX_PROMPT_TOKENS}"
    yield Case("prefill/prompt-empty", "prefill", prompt(""), INVALID, "prompt is empty")
    yield Case("prefill/prompt-blank", "prefill", prompt(" \t\n "), INVALID, "prompt is empty")
    yield Case("prefill/prompt-tokens", "prefill", prompt("cat " * 100), INVALID, limit)
    yield Case("prefill/negative-tokens", "prefill", prompt(PROMPT, "dog " * 100), INVALID, "negative_prompt is")  # fmt: skip
    valid = GenerateRequest(prompt=PROMPT, params=good_params()).SerializeToString()
    for name, data, fragment in (
        ("bad-utf8", b"\x0a\x02\xff\xfe", "String field had bad UTF-8"),
        ("truncated", valid[:-3], "is not a valid GenerateRequest"),
        ("garbage", b"\xff\xff\xff\xff", "is not a valid GenerateRequest"),
        ("field-number-0", b"\x00\x00", "is not a valid GenerateRequest"),
        ("endless-varint", b"\x08" + b"\xff" * 11, "is not a valid GenerateRequest"),
    ):
        yield Case(f"prefill/undecodable-{name}", "prefill", ask_prefill_raw(data), INVALID, fragment)  # fmt: skip
    yield Case("prefill/message-over-64MiB", "prefill", oversized_request, EXHAUSTED, "larger than max")  # fmt: skip


def oversized_request(target: Target) -> None:
    ask_prefill_raw(b"\x00" * (MAX_MESSAGE_BYTES + 1))(target)


# ---- KV-stream faults, straight to the diffusion service ---------------------------------------

Frames = list[bytes]


def edit(frame: bytes, change: Callable[[DiffusionFrame], None]) -> bytes:
    message = DiffusionFrame.FromString(frame)
    change(message)
    return message.SerializeToString()


def chunks(fs: Frames) -> list[tuple[int, kv_pb2.KVChunk]]:
    """(index in `fs`, chunk) of every chunk frame."""
    found = []
    for i, frame in enumerate(fs):
        message = DiffusionFrame.FromString(frame)
        if message.WhichOneof("frame") == "chunk":
            found.append((i, message.chunk))
    return found


def payload(fs: Frames) -> bytes:
    return b"".join(c.data for _, c in sorted(chunks(fs), key=lambda ic: ic[1].offset))


def header(change: Callable[[kv_pb2.KVHeader], None]) -> Callable[[Frames], Frames]:
    def tamper(fs: Frames) -> Frames:
        fs[0] = edit(fs[0], lambda m: change(m.header))
        return fs

    return tamper


def chunk(
    index: int, change: Callable[[kv_pb2.KVChunk, bytes], None]
) -> Callable[[Frames], Frames]:
    """Change chunk frame `fs[index]`; `change` gets the chunk and the whole payload."""

    def tamper(fs: Frames) -> Frames:
        whole = payload(fs)
        fs[index] = edit(fs[index], lambda m: change(m.chunk, whole))
        return fs

    return tamper


def trailer(change: Callable[[kv_pb2.KVTrailer], None]) -> Callable[[Frames], Frames]:
    def tamper(fs: Frames) -> Frames:
        fs[-1] = edit(fs[-1], lambda m: change(m.trailer))
        return fs

    return tamper


def setter(name: str, value) -> Callable:
    return lambda m, *_: setattr(m, name, value)


def flip_byte(c: kv_pb2.KVChunk, _: bytes) -> None:
    c.data = bytes([c.data[0] ^ 0x01]) + c.data[1:]


def flip_byte_and_fix_crc(c: kv_pb2.KVChunk, whole: bytes) -> None:
    flip_byte(c, whole)
    c.crc32c = crc32c(c.data)


def move_to(offset: int) -> Callable[[kv_pb2.KVChunk, bytes], None]:
    """The chunk carries the true payload bytes at `offset`, with a correct CRC."""

    def change(c: kv_pb2.KVChunk, whole: bytes) -> None:
        c.offset = offset
        c.data = whole[offset : offset + CHUNK]
        c.crc32c = crc32c(c.data)

    return change


def past_its_tensor(fs: Frames) -> Frames:
    """The last chunk of the first tensor grows by one true payload byte (and the declared chunk
    size with it): it now reaches into the next tensor."""
    first = [(i, c) for i, c in chunks(fs) if (c.context, c.layer, c.tensor) == (0, 0, 1)]
    index, last = max(first, key=lambda ic: ic[1].offset)
    whole = payload(fs)

    def grow(c: kv_pb2.KVChunk, _: bytes) -> None:
        c.data = whole[c.offset : c.offset + len(c.data) + 1]
        c.crc32c = crc32c(c.data)

    fs = header(setter("chunk_size", CHUNK + 1))(fs)
    return chunk(index, grow)(fs)


def beyond_the_total(fs: Frames) -> Frames:
    """One more chunk, with a correct CRC, at the payload's end."""
    total = DiffusionFrame.FromString(fs[0]).header.total_bytes
    extra = kv_pb2.KVChunk(context=0, layer=0, tensor=1, offset=total, data=b"\x00" * 16)
    extra.crc32c = crc32c(extra.data)
    return [*fs[:-1], DiffusionFrame(chunk=extra).SerializeToString(), fs[-1]]


def over_the_kv_limit(fs: Frames) -> Frames:
    """A consistent header declaring 2**16 tokens of cond context: far over --max-kv-bytes."""

    def change(h: kv_pb2.KVHeader) -> None:
        per_token = h.total_bytes // sum(c.num_tokens for c in h.contexts)
        h.total_bytes += (2**16 - h.contexts[0].num_tokens) * per_token
        h.contexts[0].num_tokens = 2**16

    return header(change)(fs)


def tampered(tamper: Callable[[Frames], Frames]) -> Callable[[Target], Frames]:
    return lambda target: tamper(good_frames(target))


def with_value(value: float) -> Callable[[Target], Frames]:
    """A true stream of a cache holding one `value` in its cond context's layer-1 V."""

    def frames(target: Target) -> Frames:
        contexts = dict(target.contexts)
        kind, cond = next(iter(contexts.items()))
        values = [v.clone() for v in cond.values]
        values[1].view(-1)[7] = value
        contexts[kind] = dataclasses.replace(cond, values=values)
        return good_frames(target, contexts=contexts)

    return frames


def oversized_frame(target: Target) -> Frames:
    return [good_frames(target)[0], b"\x00" * (MAX_MESSAGE_BYTES + 1)]


KV_FAULTS: list[tuple[str, Callable[[Target], Frames], grpc.StatusCode, str]] = [
    ("bad-crc", tampered(chunk(3, flip_byte)), DATA_LOSS, "CRC mismatch in the chunk at offset"),
    (
        "digest",
        tampered(trailer(lambda t: setattr(t, "payload_crc32c", t.payload_crc32c ^ 1))),
        DATA_LOSS,
        "payload digest mismatch",
    ),  # fmt: skip
    (
        "data-changed-with-its-crc",
        tampered(chunk(2, flip_byte_and_fix_crc)),
        DATA_LOSS,
        "payload digest mismatch",
    ),  # fmt: skip
    (
        "fingerprint",
        tampered(header(setter("model_fingerprint", "0" * 32))),
        INVALID,
        "model fingerprint mismatch",
    ),  # fmt: skip
    (
        "protocol-version",
        tampered(header(setter("protocol_version", 2))),
        INVALID,
        "unsupported protocol version 2",
    ),  # fmt: skip
    ("unknown-dtype", tampered(header(setter("dtype", 9))), INVALID, "unknown dtype 9"),
    ("unset-dtype", tampered(header(setter("dtype", 0))), INVALID, "unknown dtype 0"),
    ("num-layers", tampered(header(setter("num_layers", 5))), INVALID, "num_layers=5"),
    ("kv-heads", tampered(header(setter("num_kv_heads", 8))), INVALID, "num_kv_heads=8"),
    ("head-dim", tampered(header(setter("head_dim", 32))), INVALID, "head_dim=32"),
    (
        "total-bytes",
        tampered(header(lambda h: setattr(h, "total_bytes", h.total_bytes + 2))),
        INVALID,
        "payload bytes but its contexts need",
    ),  # fmt: skip
    (
        "repeated-kind",
        tampered(header(lambda h: setattr(h.contexts[1], "kind", 1))),
        INVALID,
        "context kind cond appears more than once",
    ),  # fmt: skip
    (
        "unknown-kind",
        tampered(header(lambda h: setattr(h.contexts[0], "kind", 7))),
        INVALID,
        "context 0 has unknown kind 7",
    ),  # fmt: skip
    (
        "no-contexts",
        tampered(header(lambda h: h.ClearField("contexts"))),
        INVALID,
        "1 to 3 contexts, got 0",
    ),  # fmt: skip
    (
        "zero-chunk-size",
        tampered(header(setter("chunk_size", 0))),
        INVALID,
        "chunk size 0 is outside",
    ),  # fmt: skip
    (
        "chunk-over-declared-size",
        tampered(header(setter("chunk_size", CHUNK // 2))),
        INVALID,
        f"exceeds the declared chunk size {CHUNK // 2}",
    ),  # fmt: skip
    (
        "offset-out-of-range",
        tampered(chunk(1, setter("offset", 10**7))),
        INVALID,
        "lie outside context 0 (cond) layer 0 K",
    ),  # fmt: skip
    (
        "chunk-past-its-tensor",
        tampered(past_its_tensor),
        INVALID,
        "lie outside context 0 (cond) layer 0 K",
    ),  # fmt: skip
    (
        "bytes-beyond-the-total",
        tampered(beyond_the_total),
        INVALID,
        "lie outside context 0 (cond) layer 0 K",
    ),  # fmt: skip
    (
        "context-out-of-range",
        tampered(chunk(1, setter("context", 7))),
        INVALID,
        "chunk context 7 out of range",
    ),  # fmt: skip
    (
        "layer-out-of-range",
        tampered(chunk(1, setter("layer", 4))),
        INVALID,
        "chunk layer 4 out of range (4)",
    ),  # fmt: skip
    (
        "neither-k-nor-v",
        tampered(chunk(1, setter("tensor", 0))),
        INVALID,
        "chunk tensor 0 is neither K nor V",
    ),  # fmt: skip
    ("empty-chunk", tampered(chunk(1, setter("data", b""))), INVALID, "empty chunk at offset 0"),
    (
        "gap",
        tampered(lambda fs: fs[:2] + fs[3:]),
        INVALID,
        f"expected offset {CHUNK} next, got {2 * CHUNK}",
    ),  # fmt: skip
    (
        "overlap",
        tampered(chunk(2, move_to(CHUNK // 2))),
        INVALID,
        f"chunk at offset {CHUNK // 2} overlaps bytes",
    ),  # fmt: skip
    ("duplicate", tampered(lambda fs: fs[:2] + fs[1:]), INVALID, "duplicate chunk at offset 0"),
    (
        "missing-last-chunk",
        tampered(lambda fs: fs[:-2] + fs[-1:]),
        INVALID,
        "the trailer came with",
    ),  # fmt: skip
    (
        "chunk-count",
        tampered(trailer(lambda t: setattr(t, "chunk_count", t.chunk_count + 1))),
        INVALID,
        "trailer counts",
    ),  # fmt: skip
    (
        "missing-header",
        tampered(lambda fs: fs[1:]),
        INVALID,
        "missing header: the first frame is a chunk",
    ),  # fmt: skip
    (
        "trailer-first",
        tampered(lambda fs: fs[-1:]),
        INVALID,
        "missing header: the first frame is a trailer",
    ),  # fmt: skip
    ("second-header", tampered(lambda fs: fs[:2] + fs[:1] + fs[2:]), INVALID, "repeated header"),
    (
        "chunk-after-trailer",
        tampered(lambda fs: fs + fs[1:2]),
        INVALID,
        "data after the trailer: a chunk frame",
    ),  # fmt: skip
    (
        "second-trailer",
        tampered(lambda fs: fs + fs[-1:]),
        INVALID,
        "data after the trailer: a second trailer",
    ),  # fmt: skip
    ("early-end", tampered(lambda fs: fs[:-1]), INVALID, "stream ended before the trailer"),
    ("header-only", tampered(lambda fs: fs[:1]), INVALID, "stream ended before the trailer"),
    ("empty-stream", tampered(lambda fs: []), INVALID, "stream ended before the header"),
    (
        "truncated-frame",
        tampered(lambda fs: fs[:1] + [fs[1][:-3]] + fs[2:]),
        INVALID,
        "malformed frame",
    ),  # fmt: skip
    (
        "two-frames-in-one",
        tampered(lambda fs: [fs[0] + fs[1]] + fs[2:]),
        INVALID,
        "exactly one of header, chunk, trailer; got 2",
    ),  # fmt: skip
    (
        "not-a-frame",
        tampered(lambda fs: fs[:1] + [b"\x0f"] + fs[1:]),
        INVALID,
        "malformed frame: unsupported wire type 7",
    ),  # fmt: skip
    ("nan-kv", with_value(math.nan), INVALID, "the KV cache holds NaN or Inf values"),
    ("inf-kv", with_value(-math.inf), INVALID, "the KV cache holds NaN or Inf values"),
    ("frame-over-64MiB", oversized_frame, EXHAUSTED, "larger than max"),
    (
        "total-over-max-kv-bytes",
        tampered(over_the_kv_limit),
        EXHAUSTED,
        f"exceeds this receiver's limit of {MAX_KV_BYTES} bytes",
    ),  # fmt: skip
]


class ParkedUpload:
    """An upload that sends its header and two chunks, then stays open and silent until
    `release` (or 20 s)."""

    def __init__(self, target: Target) -> None:
        self._release = threading.Event()
        self._sent = threading.Event()
        self.outcome: list = []
        frames = good_frames(target)

        def requests() -> Iterator[bytes]:
            yield from frames[:3]
            self._sent.set()
            self._release.wait(20)

        def run() -> None:
            try:
                self.outcome.append(upload(lambda _: requests())(target))
            except grpc.RpcError as e:
                self.outcome.append(e)

        self.thread = threading.Thread(target=run)
        self.thread.start()
        assert self._sent.wait(10)

    def result(self, timeout: float = 20.0):
        self.thread.join(timeout)
        self._release.set()
        self.thread.join(5)
        return self.outcome[0] if self.outcome else None

    def release(self) -> None:
        self._release.set()


def parked(target: Target) -> None:
    outcome = ParkedUpload(target).result()
    if isinstance(outcome, grpc.RpcError):
        raise outcome


def parked_then_evicted(target: Target) -> None:
    """A parked upload holds the room for one cache; a live upload that needs it takes it."""
    first = ParkedUpload(target)
    try:
        events = upload(good_frames)(target)
    finally:
        first.release()
    assert events[-1].WhichOneof("event") == "image"
    outcome = first.result()
    if isinstance(outcome, grpc.RpcError):
        raise outcome


def diffusion_only() -> Iterator[Case]:
    for name, frames, code, fragment in KV_FAULTS:
        yield Case(f"diffusion/kv-{name}", "diffusion", upload(frames), code, fragment)
    yield Case(
        "diffusion/kv-parked-stream",
        "diffusion",
        parked,
        DEADLINE,
        f"no KV frame for {IDLE_TIMEOUT_S:g} s after",
    )
    yield Case(
        "diffusion/kv-parked-evicted-by-a-live-upload",
        "diffusion",
        parked_then_evicted,
        EXHAUSTED,
        "upload evicted after",
    )


CASES = [*both_services(), *prefill_only(), *diffusion_only()]


def test_the_table_covers_at_least_60_hostile_inputs_on_both_services():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    assert len(CASES) >= 60
    assert {c.service for c in CASES} == {"prefill", "diffusion"}


# ---- the services and the one test -----------------------------------------------------------


@pytest.fixture(scope="module")
def target(tiny_model_dir: Path, pipeline: Pipeline, contexts) -> Iterator[Target]:
    room = kv_bytes(contexts) * 3 // 2  # one upload of `contexts` in flight, not two
    pair = ServicePair(
        tiny_model_dir,
        diffusion_args=[
            "--max-queue", "2",
            "--kv-idle-timeout", str(IDLE_TIMEOUT_S),
            "--max-inflight-kv-bytes", str(room),
            "--max-kv-bytes", str(MAX_KV_BYTES),
        ],
        prefill_args=["--max-prompt-tokens", str(MAX_PROMPT_TOKENS)],
    )  # fmt: skip
    try:
        pair.start().wait_serving()
        yield Target(
            pair.prefill.address, pair.diffusion_address, contexts, pipeline.config.fingerprint()
        )
    finally:
        pair.close()


@pytest.fixture(scope="module")
def reference(pipeline: Pipeline, contexts) -> np.ndarray:
    params = dataclasses.replace(SMALL, seed=FOLLOW_UP_SEED)
    latents = pipeline.denoise(contexts, params)
    return pixels(pipeline.decode(latents, params.height, params.width))


def follow_up(case: Case, target: Target, request_id: str) -> np.ndarray:
    """A correct request to the service the case went to; its image."""
    if case.service == "prefill":
        request = GenerateRequest(prompt=PROMPT, params=good_params(), request_id=request_id)
        events = ask_prefill(request)(target)
    else:
        events = upload(lambda t: good_frames(t, request_id=request_id))(target)
    assert events[0].accepted.request_id == request_id
    assert events[-1].WhichOneof("event") == "image", events[-1]
    return pixels(Image.open(io.BytesIO(events[-1].image.png)))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_hostile_input_gets_its_status_and_message_and_the_next_request_is_correct(
    case: Case, target: Target, reference: np.ndarray, tally: Tally
):
    with tally.hostile_input():
        with pytest.raises(grpc.RpcError) as err:
            case.send(target)
        assert err.value.code() == case.code, err.value.details()
        assert case.fragment.lower() in (err.value.details() or "").lower(), err.value.details()
        assert np.abs(follow_up(case, target, f"after-{CASES.index(case)}") - reference).max() <= 1
