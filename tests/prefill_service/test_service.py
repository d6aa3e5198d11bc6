"""The prefill service over real gRPC on 127.0.0.1, against a fake diffusion service that assembles
the KV stream with transport's FrameAssembler."""

from __future__ import annotations

import logging
import re
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from bagel.checkpoints.checkpoint import load_bagel
from bagel.network.kv import Branch
from bagel.prompting.prompts import cfg_prompts
from bagel.text.tokenizer import load_tokenizer
from client import BagelClient
from client.cli import parse_args
from prefill_service.settings import PrefillSettings
from protos import PREFILL_SERVICE, GenerateEvent, GenerateRequest, kv_pb2
from serving.params import DBCache, GenerationParams
from tests.diffusion_service.test_job import params_on_every_rank_in_a_fresh_process
from tests.helpers.metrics import metrics_when
from tests.helpers.processes import ServiceProcess
from tests.helpers.ranks import free_port
from tests.prefill_service.conftest import RunningPrefill
from tests.prefill_service.fake_diffusion import FakeDiffusion
from tests.serving.examples import EVERY_FIELD, EVERY_FIELD_FLAGS, fields_left_at_default

SMALL = {"height": 64, "width": 64}


@pytest.fixture(scope="module")
def reference_model(tiny_model_dir: Path):
    return load_bagel(tiny_model_dir, "prefill", torch.float32, "cpu")


@pytest.mark.parametrize("negative", ["", "blurry, low quality"])
def test_kv_that_arrives_equals_in_process_prefill_bit_for_bit(
    prefill, fake_diffusion, tiny_model_dir, reference_model, negative
):
    prompt = "A cute cat sitting on a blue sofa"
    with BagelClient(prefill.address, timeout=30) as client:
        result = client.generate(
            prompt, seed=52, negative_prompt=negative, request_id="req-bits", **SMALL
        )

    [call] = fake_diffusion.calls
    received = call.received
    assert received.request_id == "req-bits" == result.request_id
    assert call.header.dtype == kv_pb2.DTYPE_FP32
    assert received.params.seed == 52 and received.params.HasField("num_timesteps")
    assert received.params.negative_prompt == negative

    prompts = cfg_prompts(load_tokenizer(tiny_model_dir), prompt, negative)
    expected = reference_model.prefill(list(prompts.values()))
    assert [c.kind for c in received.cache.contexts] == list(prompts)
    for got, want, ids in zip(received.cache.contexts, expected, prompts.values(), strict=True):
        assert got.num_tokens == len(ids) and got.next_rope_position == want.next_rope_position
        for layer in range(len(want.keys)):
            assert torch.equal(got.keys[layer], want.keys[layer])
            assert torch.equal(got.values[layer], want.values[layer])
    if negative == "":
        assert received.cache.contexts[1].num_tokens == 0


def test_concurrent_requests_each_get_their_own_kv(
    prefill, fake_diffusion, tiny_model_dir, reference_model
):
    """4 clients x 2 requests at once: every KV stream that arrives belongs to its request."""
    tokenizer = load_tokenizer(tiny_model_dir)
    prompts = {f"c{i}-{j}": f"A cat number {i} in room {j}" for i in range(4) for j in range(2)}
    results: dict[str, int] = {}

    def client_thread(i: int) -> None:
        with BagelClient(prefill.address, timeout=60) as client:
            for j in range(2):
                rid = f"c{i}-{j}"
                results[rid] = client.generate(
                    prompts[rid], seed=10 * i + j, request_id=rid, **SMALL
                ).seed

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {f"c{i}-{j}": 10 * i + j for i in range(4) for j in range(2)}
    assert len(fake_diffusion.calls) == 8
    for call in fake_diffusion.calls:
        rid = call.received.request_id
        assert call.received.params.seed == results[rid]
        ids = cfg_prompts(tokenizer, prompts[rid])[Branch.COND]
        [want] = reference_model.prefill([ids])
        got = call.received.cache.contexts[0]
        for layer in range(len(want.keys)):
            assert torch.allclose(got.keys[layer], want.keys[layer], rtol=1e-5, atol=1e-6)
            assert torch.allclose(got.values[layer], want.values[layer], rtol=1e-5, atol=1e-6)


def test_layers_stream_while_prefill_still_computes(prefill, fake_diffusion, lm_source):
    """The producer is held before computing the last layer until the fake diffusion service has
    received a layer-0 chunk: a sender that waited for the whole cache would never get there."""
    last = lm_source.config.llm.num_layers - 1
    gate_opened: list[bool] = []

    def before_layer(index: int) -> None:
        if index == last:
            gate_opened.append(fake_diffusion.layer0_seen.wait(timeout=10))

    lm_source.before_layer = before_layer
    with BagelClient(prefill.address, timeout=30) as client:
        client.generate("A dog running across a green field", seed=1, **SMALL)

    assert gate_opened == [True]
    [call] = fake_diffusion.calls
    kinds = [kind for _, kind, _ in call.frames]
    assert kinds[0] == "header" and kinds[-1] == "trailer"
    assert call.first_chunk_time(0) < lm_source.layer_done_times[last]


def test_events_are_relayed_in_order_with_usage_and_prefill_timings_added(
    prefill, fake_diffusion, tiny_model_dir
):
    started = time.perf_counter()
    with BagelClient(prefill.address, timeout=30) as client:
        events = list(client.stream("A red apple", seed=7, **SMALL))
    wall_ms = (time.perf_counter() - started) * 1000
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["accepted", "usage", "progress", "progress", "progress", "timings", "image"]
    framed = cfg_prompts(load_tokenizer(tiny_model_dir), "A red apple")[Branch.COND]
    assert events[1].usage.prompt_tokens == len(framed) > 0
    timings = events[5].timings
    assert timings.prefill_ms > 0 and timings.kv_send_ms > 0
    # the front door's own total: past its prefill and send, within the client's wall time
    assert timings.prefill_ms < timings.total_ms < wall_ms
    assert timings.kv_send_ms < timings.total_ms
    assert timings.receive_ms == 1.5 and timings.decode_ms == 0.5  # the diffusion side's, as sent
    assert events[6].image.seed == 7 and events[6].image.width == 64


def test_timings_event_is_added_when_the_diffusion_service_sends_none(prefill, fake_diffusion):
    fake_diffusion.reset(send_timings=False)
    with BagelClient(prefill.address, timeout=30) as client:
        events = list(client.stream("A red apple", seed=7, **SMALL))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-2:] == ["timings", "image"]
    assert events[-2].timings.prefill_ms > 0 and not events[-2].timings.HasField("receive_ms")


@pytest.mark.parametrize(
    ("prompt", "params", "needle"),
    [
        ("A cat", {"height": 100}, "height"),
        ("A cat", {"num_timesteps": 1}, "num_timesteps"),
        ("A cat", {"cfg_interval": (0.9, 0.1)}, "cfg_interval"),
        ("A cat", {"cfg_text_scale": -1.0}, "cfg_text_scale"),
        ("", {}, "prompt is empty"),
        ("   ", {}, "prompt is empty"),
        ("cat " * 400, {}, "tokens long"),
        ("A cat", {"negative_prompt": "dog " * 400}, "negative_prompt is"),
        ("A cat", {"request_id": "bad\nid"}, "request_id"),
    ],
)
def test_bad_request_is_invalid_argument_and_nothing_reaches_diffusion(
    prefill, fake_diffusion, lm_source, prompt, params, needle
):
    with BagelClient(prefill.address, timeout=30) as client, pytest.raises(grpc.RpcError) as info:
        client.generate(prompt, **params)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert needle in info.value.details()
    assert fake_diffusion.calls == []
    assert lm_source.layer_done_times == []  # no layer was computed


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full: 8 requests waiting"),
        (grpc.StatusCode.DATA_LOSS, "CRC mismatch in the chunk at offset 0"),
        (grpc.StatusCode.FAILED_PRECONDITION, "rank 3 restarted"),
    ],
)
def test_status_from_diffusion_is_relayed_unchanged(prefill, fake_diffusion, code, message):
    fake_diffusion.reset(fail_with=(code, message))
    with BagelClient(prefill.address, timeout=30) as client, pytest.raises(grpc.RpcError) as info:
        client.generate("A cute cat", seed=3, **SMALL)
    assert info.value.code() is code
    assert info.value.details() == message


def test_failure_while_computing_kv_is_internal_and_cancels_the_downstream_call(
    prefill, fake_diffusion, lm_source
):
    def before_layer(index: int) -> None:
        if index == 2:
            fake_diffusion.layer0_seen.wait(5)
            raise RuntimeError("device fell off the bus")

    lm_source.before_layer = before_layer
    with BagelClient(prefill.address, timeout=30) as client, pytest.raises(grpc.RpcError) as info:
        client.generate("A cute cat", seed=3, **SMALL)
    assert info.value.code() is grpc.StatusCode.INTERNAL
    assert "device fell off the bus" in info.value.details()
    [call] = fake_diffusion.calls
    assert call.ended.wait(5) and call.received is None
    assert call.header is not None and "trailer" not in [kind for _, kind, _ in call.frames]


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_client_cancel_or_deadline_cancels_the_downstream_call(prefill, fake_diffusion, how):
    fake_diffusion.reset(steps=100, step_delay_s=0.1)
    with BagelClient(prefill.address) as client:
        events = client.stream(
            "A cute cat", seed=3, timeout=1.5 if how == "deadline" else 30, **SMALL
        )
        with pytest.raises(grpc.RpcError) as info:
            for event in events:
                if how == "cancel" and event.WhichOneof("event") == "progress":
                    events.cancel()
    expected = grpc.StatusCode.CANCELLED if how == "cancel" else grpc.StatusCode.DEADLINE_EXCEEDED
    assert info.value.code() is expected
    [call] = fake_diffusion.calls
    assert call.ended.wait(5), "the diffusion call was not ended"
    assert call.cancelled


def test_unreachable_diffusion_is_unavailable_within_the_deadline(
    loop_thread, tiny_model_dir, lm_source
):
    address = f"127.0.0.1:{free_port()}"
    settings = PrefillSettings(
        model_dir=str(tiny_model_dir), listen="127.0.0.1:0", diffusion=address, connect_timeout_s=30
    )
    running = RunningPrefill(loop_thread, settings, lm_source)
    try:
        with BagelClient(running.address) as client:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                client.generate("A cute cat", timeout=1.5, **SMALL)
            elapsed = time.monotonic() - started
    finally:
        running.stop()
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert address in info.value.details()
    assert 0.5 < elapsed < 1.5
    assert lm_source.layer_done_times == []


def test_unreachable_diffusion_without_deadline_gives_up_after_connect_timeout(
    loop_thread, tiny_model_dir, lm_source
):
    address = f"127.0.0.1:{free_port()}"
    settings = PrefillSettings(
        model_dir=str(tiny_model_dir),
        listen="127.0.0.1:0",
        diffusion=address,
        connect_timeout_s=0.5,
    )
    running = RunningPrefill(loop_thread, settings, lm_source)
    try:
        with BagelClient(running.address) as client, pytest.raises(grpc.RpcError) as info:
            client.generate("A cute cat", **SMALL)
    finally:
        running.stop()
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert address in info.value.details()


def test_diffusion_that_comes_up_late_is_reached_by_retrying(
    loop_thread, tiny_model_dir, tiny_config, lm_source
):
    port = free_port()
    settings = PrefillSettings(
        model_dir=str(tiny_model_dir), listen="127.0.0.1:0", diffusion=f"127.0.0.1:{port}"
    )
    running = RunningPrefill(loop_thread, settings, lm_source)
    late = FakeDiffusion(tiny_config)
    starter = threading.Timer(0.6, lambda: loop_thread.run(late.start(port)))
    try:
        starter.start()
        with BagelClient(running.address) as client:
            result = client.generate("A cute cat", seed=5, timeout=10, **SMALL)
    finally:
        starter.join()
        running.stop()
        loop_thread.run(late.stop())
    assert result.seed == 5 and len(late.calls) == 1


def test_health_is_serving_and_reflection_lists_prefill(prefill):
    with BagelClient(prefill.address) as client:
        assert client.health() == "SERVING"
        assert client.health(PREFILL_SERVICE) == "SERVING"
    with grpc.insecure_channel(prefill.address) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert PREFILL_SERVICE == "bagel.v1.Prefill"
    assert {"bagel.v1.Prefill", "grpc.health.v1.Health"} <= set(services)


def test_health_turns_not_serving_on_shutdown(
    loop_thread, tiny_model_dir, fake_diffusion, lm_source
):
    settings = PrefillSettings(
        model_dir=str(tiny_model_dir), listen="127.0.0.1:0", diffusion=fake_diffusion.address
    )
    running = RunningPrefill(loop_thread, settings, lm_source)
    with grpc.insecure_channel(running.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stopping = loop_thread.submit(running.server.stop(5.0))
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()  # the last call in flight: the server stops without waiting out the grace
        stopping.result(10)


def test_metrics_count_requests_and_kv_bytes(prefill, fake_diffusion, metrics_port):
    with BagelClient(prefill.address, timeout=30) as client:
        client.generate("A cute cat", seed=1, **SMALL)
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
        .read()
        .decode()
    )
    ok = re.search(r'^bagel_prefill_requests_total\{code="OK"\} (\S+)$', text, re.M)
    sent = re.search(r"^bagel_prefill_kv_bytes_sent_total (\S+)$", text, re.M)
    assert ok and float(ok.group(1)) >= 1
    assert sent and float(sent.group(1)) > 0
    assert 'bagel_prefill_phase_seconds_count{phase="prefill"}' in text
    load = re.search(r"^bagel_prefill_model_load_seconds (\S+)$", text, re.M)
    assert load and float(load.group(1)) > 0


def test_prefill_service_process_serves_and_stops_on_sigterm(tiny_model_dir, fake_diffusion):
    args = [
        "--model",
        str(tiny_model_dir),
        "--diffusion",
        fake_diffusion.address,
        "--device",
        "cpu",
    ]
    with ServiceProcess("prefill_service", args) as service:
        service.wait_serving()
        with BagelClient(service.address, timeout=30) as client:
            result = client.generate("A cute cat", seed=9, request_id="proc-1", **SMALL)
        assert result.seed == 9 and result.image.size == (64, 64)
        assert service.stop() == 0
        log = service.log()
    assert "[proc-1]" in log and "stopped" in log


# ---- every field end to end, and the limits --------------------------------------------------


def test_every_field_from_the_cli_arrives_unchanged_at_every_diffusion_rank(
    prefill, fake_diffusion
):
    """CLI flags -> client -> prefill service -> KV header -> rank message on 4 ranks."""
    assert fields_left_at_default(EVERY_FIELD) == []
    args = parse_args(["generate", "A cute cat", "-o", "unused.png", *EVERY_FIELD_FLAGS])
    with BagelClient(prefill.address, timeout=30) as client:
        result = client.generate(args.prompt, **args.params)
    assert result.request_id == "every-field-1" and result.seed == EVERY_FIELD.seed

    [call] = fake_diffusion.calls
    assert call.received.request_id == "every-field-1"
    arrived = GenerationParams.from_proto(call.received.params)
    assert arrived == EVERY_FIELD
    assert [c.kind for c in call.received.cache.contexts] == [Branch.COND, Branch.UNCOND_TEXT]
    assert call.received.cache.contexts[1].num_tokens > 0  # the negative prompt was prefilled

    # This process runs gRPC threads and must not fork: the 4 ranks start from a new interpreter.
    on_ranks = params_on_every_rank_in_a_fresh_process(arrived.to_bytes(), world=4)
    assert [GenerationParams.from_bytes(data) for data in on_ranks] == [EVERY_FIELD] * 4


def _prompt_of_tokens(tokenizer, tokens: int) -> str:
    """A prompt whose framed encoding is exactly `tokens` tokens long."""
    for n in range(tokens):
        prompt = "dog " * n
        if len(cfg_prompts(tokenizer, prompt)[Branch.COND]) == tokens:
            return prompt
    raise AssertionError(f"no prompt of {tokens} tokens")


@pytest.mark.parametrize("which", ["prompt", "negative_prompt"])
def test_prompt_of_exactly_the_token_limit_passes_and_one_more_token_is_invalid(
    prefill, fake_diffusion, lm_source, tiny_model_dir, which
):
    limit = 256  # the prefill_server fixture's max_prompt_tokens
    tokenizer = load_tokenizer(tiny_model_dir)
    at_limit, over = _prompt_of_tokens(tokenizer, limit), _prompt_of_tokens(tokenizer, limit + 1)

    def ask(text: str):
        prompt, negative = ("A cat", text) if which == "negative_prompt" else (text, "")
        return client.generate(prompt, negative_prompt=negative, seed=1, **SMALL)

    with BagelClient(prefill.address, timeout=30) as client:
        ask(at_limit)
        [call] = fake_diffusion.calls
        index = 1 if which == "negative_prompt" else 0
        assert call.received.cache.contexts[index].num_tokens == limit
        with pytest.raises(grpc.RpcError) as info:
            ask(over)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == (
        f"{which} is {limit + 1} tokens long with its framing; the limit is {limit}"
    )
    assert len(fake_diffusion.calls) == 1


@pytest.mark.parametrize(("fn", "bn", "fits"), [(2, 1, True), (3, 0, True), (3, 1, False)])
def test_db_cache_must_leave_a_block_of_the_model_to_cache(prefill, fake_diffusion, fn, bn, fits):
    cache = DBCache(fn_compute_blocks=fn, bn_compute_blocks=bn)  # the tiny model has 4 layers
    with BagelClient(prefill.address, timeout=30) as client:
        if fits:
            client.generate("A cat", cache=cache, seed=1, **SMALL)
            [call] = fake_diffusion.calls
            assert GenerationParams.from_proto(call.received.params).cache == cache
            return
        with pytest.raises(grpc.RpcError) as info:
            client.generate("A cat", cache=cache, seed=1, **SMALL)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "leaves none of the model's 4 blocks" in info.value.details()
    assert fake_diffusion.calls == []


class DeadlineRecordingDiffusion(FakeDiffusion):
    """Records the deadline each Diffusion.Generate call arrives with."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.time_remaining: list[float | None] = []

    async def generate(self, frames, context):
        self.time_remaining.append(context.time_remaining())
        async for event in super().generate(frames, context):
            yield event


def test_the_callers_deadline_is_passed_on_to_the_diffusion_call(
    loop_thread, tiny_model_dir, tiny_config, lm_source
):
    recorder = DeadlineRecordingDiffusion(tiny_config)
    loop_thread.run(recorder.start())
    settings = PrefillSettings(
        model_dir=str(tiny_model_dir), listen="127.0.0.1:0", diffusion=recorder.address
    )
    running = RunningPrefill(loop_thread, settings, lm_source)
    try:
        with BagelClient(running.address) as client:
            client.generate("A cute cat", seed=1, timeout=20, **SMALL)
            client.generate("A cute cat", seed=1, **SMALL)
    finally:
        running.stop()
        loop_thread.run(recorder.stop())
    with_deadline, without = recorder.time_remaining
    assert with_deadline is not None and 10 < with_deadline < 21  # gRPC rounds deadlines up
    assert without is None


# ---- hostile input, deadlines, logs and health ----------------------------------------------


def _prefill_log(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith(("prefill_service", "grpc"))]


@pytest.mark.parametrize(
    ("data", "fault"),
    [
        (b"\x0a\x02\xff\xfe", "String field had bad UTF-8"),
        (GenerateRequest(prompt="A cute cat").SerializeToString()[:-3], "corrupt"),
        (b"\xff\xff\xff\xff", "corrupt"),
    ],
    ids=["bad-utf8", "truncated", "garbage"],
)
def test_undecodable_request_is_invalid_argument_with_one_log_line_and_no_traceback(
    prefill, fake_diffusion, caplog, data, fault
):
    caplog.set_level(logging.INFO)
    with grpc.insecure_channel(prefill.address) as channel:
        call = channel.unary_stream(
            f"/{PREFILL_SERVICE}/Generate",
            request_serializer=None,
            response_deserializer=GenerateEvent.FromString,
        )
        with pytest.raises(grpc.RpcError) as info:
            list(call(data, timeout=10))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert f"the request ({len(data)} bytes) is not a valid GenerateRequest" in info.value.details()
    assert fault in info.value.details()
    [record] = _prefill_log(caplog)
    assert record.levelno == logging.WARNING and not record.exc_info
    assert "failed: INVALID_ARGUMENT: the request" in record.getMessage()
    assert fake_diffusion.calls == []
    with BagelClient(prefill.address, timeout=30) as client:
        assert client.generate("A cute cat", seed=2, **SMALL).seed == 2


@pytest.mark.parametrize("timeout", [0.05, 0.2])
def test_a_deadline_shorter_than_the_work_is_deadline_exceeded_not_unavailable(
    prefill, fake_diffusion, caplog, metrics_port, timeout
):
    caplog.set_level(logging.INFO, logger="prefill_service")
    fake_diffusion.reset(step_delay_s=0.2)  # the whole call takes longer than either deadline
    with BagelClient(prefill.address) as client, pytest.raises(grpc.RpcError) as info:
        client.generate("A cute cat", seed=3, timeout=timeout, **SMALL)
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED, info.value.details()
    text = metrics_when(metrics_port, 'requests_total{code="DEADLINE_EXCEEDED"}')
    assert 'bagel_prefill_requests_total{code="DEADLINE_EXCEEDED"}' in text
    deadline = time.monotonic() + 5
    while "DEADLINE_EXCEEDED" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "DEADLINE_EXCEEDED" in caplog.text
    assert "UNAVAILABLE" not in caplog.text and "CANCELLED" not in caplog.text
    assert "done in" not in caplog.text
    fake_diffusion.reset()
    with BagelClient(prefill.address, timeout=30) as client:
        assert client.generate("A cute cat", seed=4, **SMALL).seed == 4


def test_cancel_and_deadline_are_logged_and_counted_as_themselves_never_as_ok(
    prefill, fake_diffusion, caplog, metrics_port
):
    caplog.set_level(logging.INFO, logger="prefill_service")
    before = _count(metrics_port, "OK")
    fake_diffusion.reset(steps=100, step_delay_s=0.05)
    with BagelClient(prefill.address) as client:
        events = client.stream("A cute cat", seed=3, timeout=30, **SMALL)
        with pytest.raises(grpc.RpcError):
            for event in events:
                if event.WhichOneof("event") == "progress":
                    events.cancel()
        with pytest.raises(grpc.RpcError) as info:
            list(client.stream("A cute cat", seed=3, timeout=1.0, **SMALL))
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 5
    while caplog.text.count("ended by the caller") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    ended = [r.getMessage() for r in caplog.records if "ended by the caller" in r.getMessage()]
    assert [m.split(": ")[-1] for m in ended] == ["CANCELLED", "DEADLINE_EXCEEDED"]
    assert "done in" not in caplog.text
    assert _count(metrics_port, "OK") == before


def _count(metrics_port: int, code: str) -> float:
    text = metrics_when(metrics_port, "bagel_prefill_requests_total")
    found = re.search(rf'^bagel_prefill_requests_total\{{code="{code}"\}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize(
    "request_id",
    ["forged\n2026-12-01 INFO prefill_service: [admin] done", "x\x1b[2J" + "y" * 100_000],
    ids=["newline", "100k"],
)
def test_a_bad_request_id_is_rejected_without_reaching_the_log_raw(
    prefill, fake_diffusion, caplog, request_id
):
    caplog.set_level(logging.INFO)
    with BagelClient(prefill.address, timeout=30) as client, pytest.raises(grpc.RpcError) as info:
        client.generate("A cute cat", request_id=request_id, **SMALL)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id must be 1 to 128 printable ASCII characters" in info.value.details()
    assert request_id not in info.value.details()
    messages = [r.getMessage() for r in _prefill_log(caplog)]
    assert messages and all("\n" not in m and "\x1b" not in m and len(m) < 600 for m in messages)
    assert fake_diffusion.calls == []
    with BagelClient(prefill.address, timeout=30) as client:
        assert client.generate("A cute cat", seed=5, request_id="ok-1", **SMALL).seed == 5


def _health(address: str) -> str:
    with BagelClient(address) as client:
        return client.health()


def _health_becomes(address: str, status: str, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while _health(address) != status:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_prefill_health_follows_the_diffusion_service_and_requests_wait_for_it(
    loop_thread, tiny_model_dir, tiny_config, lm_source
):
    fake = FakeDiffusion(tiny_config)
    loop_thread.run(fake.start())
    loop_thread.run(fake.set_serving(False))  # loading, as far as anyone can tell
    settings = PrefillSettings(
        model_dir=str(tiny_model_dir), listen="127.0.0.1:0", diffusion=fake.address
    )
    running = RunningPrefill(loop_thread, settings, lm_source)
    try:
        assert _health(running.address) == "NOT_SERVING"
        with BagelClient(running.address) as client:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                client.generate("A cute cat", timeout=1.0, **SMALL)
            elapsed = time.monotonic() - started
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert info.value.details() == (
                f"diffusion service at {fake.address} is not serving (loading or restarting)"
            )
            assert 0.6 < elapsed < 1.0 and fake.calls == []
            # one that the diffusion service becomes ready for within its deadline goes through
            threading.Timer(0.5, lambda: loop_thread.run(fake.set_serving(True))).start()
            assert client.generate("A cute cat", seed=6, timeout=10, **SMALL).seed == 6
        assert _health_becomes(running.address, "SERVING")
        loop_thread.run(fake.set_serving(False))
        assert _health_becomes(running.address, "NOT_SERVING")
        loop_thread.run(fake.stop())
        assert _health(running.address) == "NOT_SERVING"
    finally:
        running.stop()
        loop_thread.run(fake.stop())
