"""`AsyncBagelClient` against the fake Prefill server: the same requests and results as
`BagelClient` (images and text), cancellation that the server sees, deadlines, health and the
bearer token."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2

from client import (
    AsyncBagelClient,
    BagelClient,
    IncompleteAnswer,
    IncompleteGeneration,
    async_client,
)
from client.client import HEALTH_TIMEOUT_S
from client.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from client.text import understand_request
from protos.options import channel_options
from tests.client.fake_prefill import FakePrefillServer


@pytest.fixture
def fake():
    server = FakePrefillServer()
    yield server
    server.stop()


def run(coroutine):
    return asyncio.run(coroutine)


def test_generate_gives_what_the_sync_client_gives_and_sends_the_same_request(fake):
    kwargs = {"width": 48, "height": 32, "seed": 7, "request_id": "abc", "cache": "teacache"}

    async def generate():
        async with AsyncBagelClient(fake.address, timeout=10) as client:
            return await client.generate("A cute cat", **kwargs)

    got = run(generate())
    with BagelClient(fake.address, timeout=10) as client:
        want = client.generate("A cute cat", **kwargs)
    assert got.png == want.png and got.png.startswith(b"\x89PNG")
    assert (got.width, got.height, got.seed, got.request_id) == (48, 32, 7, "abc")
    assert got.timings == want.timings and got.steps == want.steps
    first, second = fake.servicer.requests
    assert first == second


def test_edit_sends_the_input_image(fake):
    async def edit():
        async with AsyncBagelClient(fake.address, timeout=10) as client:
            return await client.edit(b"\x89PNG fake", "make it blue", seed=3)

    run(edit())
    [request] = fake.servicer.requests
    assert list(request.input_images) == [b"\x89PNG fake"]


def test_cancelling_the_task_cancels_the_call_and_the_server_sees_it(fake):
    fake.servicer.steps, fake.servicer.step_delay_s = 100, 0.05

    async def cancelled():
        async with AsyncBagelClient(fake.address, timeout=30) as client:
            task = asyncio.ensure_future(client.generate("A cute cat"))
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    run(cancelled())
    assert fake.servicer.cancelled.wait(5)


def test_a_failed_call_raises_its_status(fake):
    fake.servicer.fail_with = (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full")

    async def failing():
        async with AsyncBagelClient(fake.address) as client:
            await client.generate("A cute cat")

    with pytest.raises(ResourceExhausted) as info:
        run(failing())
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details() == "queue is full"


def test_a_deadline_gives_deadline_exceeded(fake):
    fake.servicer.steps, fake.servicer.step_delay_s = 100, 0.05

    async def slow():
        async with AsyncBagelClient(fake.address, timeout=0.5) as client:
            await client.generate("A cute cat")

    with pytest.raises(DeadlineExceeded) as info:
        run(slow())
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_failure_after_accepted_carries_the_servers_request_id(fake):
    fake.servicer.steps, fake.servicer.step_delay_s = 100, 0.05

    async def slow():
        async with AsyncBagelClient(fake.address, timeout=0.5) as client:
            await client.generate("A cute cat", width=32, height=32)

    with pytest.raises(DeadlineExceeded) as info:
        run(slow())
    assert info.value.request_id == "srv-1"


@pytest.mark.parametrize("call", ["chat", "generate", "edit"])
def test_a_failure_before_accepted_carries_the_callers_request_id(fake, call):
    fake.servicer.fail_with = (grpc.StatusCode.INVALID_ARGUMENT, "bad prompt")

    async def refused():
        async with AsyncBagelClient(fake.address) as client:
            if call == "chat":
                await client.chat("hi", request_id="mine-7")
            elif call == "generate":
                await client.generate("A cat", width=32, height=32, request_id="mine-7")
            else:
                await client.edit(b"\x89PNG fake", "blue", request_id="mine-7")

    with pytest.raises(InvalidArgument) as info:
        run(refused())
    assert info.value.request_id == "mine-7"


def test_an_unreachable_server_is_unavailable_for_generate_and_health():
    async def calls():
        async with AsyncBagelClient("127.0.0.1:1", timeout=2) as client:
            with pytest.raises(Unavailable):
                await client.generate("A cute cat", width=32, height=32)
            with pytest.raises(Unavailable):
                await client.health()

    run(calls())


def test_health_and_an_imageless_stream(fake, no_image):
    async def check():
        async with AsyncBagelClient(fake.address) as client:
            fake.set_health("NOT_SERVING")
            assert await client.health() == "NOT_SERVING"
        async with AsyncBagelClient(no_image.address) as client:
            with pytest.raises(IncompleteGeneration):
                await client.generate("A cute cat")

    run(check())


def test_a_token_travels_as_authorization_metadata_over_plaintext(fake):
    async def generate():
        async with AsyncBagelClient(fake.address, auth_token="tok-1") as client:
            await client.generate("A cute cat")

    run(generate())
    assert ("authorization", "Bearer tok-1") in fake.servicer.metadata


def test_chat_gives_what_the_sync_client_gives_and_sends_the_same_request(fake):
    seen = []
    kwargs = {"top_k": 4, "think": True, "request_id": "t-1"}

    async def chat():
        async with AsyncBagelClient(fake.address, timeout=10) as client:
            return await client.chat("Hi there", on_text=seen.append, **kwargs)

    got = run(chat())
    with BagelClient(fake.address, timeout=10) as client:
        want = client.chat("Hi there", **kwargs)
    assert got == want
    assert got.text == "The cat sleeps." and got.request_id == "t-1"
    assert seen == ["The ", "cat", " sleeps."]  # the deltas only, each once
    first, second = fake.servicer.understand_requests
    assert first == second == understand_request([("user", "Hi there")], **kwargs)


def test_chat_sends_a_conversation_and_understand_the_image_then_the_question(fake):
    conversation = [("system", "Be brief."), ("user", "Hi")]

    async def ask():
        async with AsyncBagelClient(fake.address, timeout=10) as client:
            await client.chat(conversation)
            return await client.understand(b"\x89PNG img", "What is it?", seed=2)

    result = run(ask())
    assert (result.text, result.request_id) == ("The cat sleeps.", "srv-2")
    first, second = fake.servicer.understand_requests
    assert first == understand_request(conversation)
    assert second == understand_request([("user", [b"\x89PNG img", "What is it?"])], seed=2)


def test_understand_passes_on_text(fake):
    seen = []

    async def ask():
        async with AsyncBagelClient(fake.address, timeout=10) as client:
            return await client.understand(b"\x89PNG", "What?", on_text=seen.append)

    run(ask())
    assert seen == ["The ", "cat", " sleeps."]


def test_understand_stream_yields_the_raw_events(fake):
    async def events():
        async with AsyncBagelClient(fake.address, timeout=10) as client:
            stream = client.understand_stream([("user", "hi")], request_id="raw")
            async with stream:
                return [event async for event in stream]

    got = run(events())
    assert [e.WhichOneof("event") for e in got] == [
        "accepted",
        "delta",
        "delta",
        "delta",
        "finished",
    ]
    assert got[0].accepted.request_id == "raw"


def test_a_text_call_without_a_final_event_raises_incomplete_answer(fake):
    fake.servicer.finish = False

    async def chat():
        async with AsyncBagelClient(fake.address, timeout=10) as client:
            await client.chat("hi")

    with pytest.raises(IncompleteAnswer, match="^request srv-2 ended without a final event$"):
        run(chat())


def test_a_failed_text_call_raises_its_status(fake):
    fake.servicer.fail_with = (grpc.StatusCode.UNAVAILABLE, "loading")

    async def chat():
        async with AsyncBagelClient(fake.address) as client:
            await client.chat("hi")

    with pytest.raises(Unavailable) as info:
        run(chat())
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.UNAVAILABLE, "loading")


@pytest.mark.parametrize("call", ["chat", "understand", "understand_stream", "default"])
def test_a_text_calls_deadline_is_its_timeout_or_the_clients(fake, call):
    fake.servicer.answer, fake.servicer.step_delay_s = ["word "] * 40, 0.05

    async def slow():
        async with AsyncBagelClient(fake.address, timeout=0.4 if call == "default" else None) as c:
            if call == "chat":
                await c.chat("hi", timeout=0.4)
            elif call == "understand":
                await c.understand(b"\x89PNG", "hi", timeout=0.4)
            elif call == "understand_stream":
                async with c.understand_stream([("user", "hi")], timeout=0.4) as stream:
                    [event async for event in stream]
            else:
                await c.chat("hi")

    with pytest.raises(DeadlineExceeded) as info:
        run(slow())
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_token_travels_with_a_text_call(fake):
    async def chat():
        async with AsyncBagelClient(fake.address, auth_token="tok-2") as client:
            await client.chat("hi")

    run(chat())
    assert ("authorization", "Bearer tok-2") in fake.servicer.metadata


def test_the_client_keeps_its_address_and_timeout_and_opens_the_channel_the_flags_ask_for(
    monkeypatch,
):
    opened = []

    def open_aio_channel(*args, **kwargs):
        opened.append((args, kwargs))
        return grpc.aio.insecure_channel("127.0.0.1:1"), ()

    monkeypatch.setattr(async_client, "open_aio_channel", open_aio_channel)

    async def make():
        tls = {"tls_ca": "ca.pem", "tls_cert": "c.pem", "tls_key": "k.pem"}
        async with AsyncBagelClient("h:1", 2.5, auth_token="tok", **tls) as client:
            return client.address, client.timeout

    assert run(make()) == ("h:1", 2.5)
    assert opened == [
        (
            ("h:1", channel_options()),
            {"tls_ca": "ca.pem", "tls_cert": "c.pem", "tls_key": "k.pem", "auth_token": "tok"},
        )
    ]


def test_generate_shows_every_event_and_sizes_latents_from_the_request(fake):
    seen = []

    async def generate():
        async with AsyncBagelClient(fake.address, timeout=10) as client:
            return await client.generate(
                "A cat", width=32, height=48, output_format="latents", on_event=seen.append
            )

    result = run(generate())
    assert (result.width, result.height, result.seed) == (32, 48, 1234)
    assert result.latents.shape == (6, 64) and result.image is None
    kinds = ["accepted", "progress", "progress", "progress", "timings", "latents"]
    assert [event.WhichOneof("event") for event in seen] == kinds


def test_an_imageless_stream_names_the_callers_request_id(no_image):
    async def generate(**params):
        async with AsyncBagelClient(no_image.address, timeout=10) as client:
            await client.generate("A cat", **params)

    with pytest.raises(IncompleteGeneration, match="^request r-9 ended without an image$"):
        run(generate(request_id="r-9"))
    with pytest.raises(IncompleteGeneration, match=r"^request \? ended without an image$"):
        run(generate())


def test_edit_sends_the_prompt_and_every_parameter_and_shows_every_event(fake):
    seen = []

    async def edit():
        async with AsyncBagelClient(fake.address, timeout=10) as client:
            return await client.edit(
                b"\x89PNG fake", "make it blue", on_event=seen.append, seed=3, width=48
            )

    result = run(edit())
    [request] = fake.servicer.requests
    assert request.prompt == "make it blue" and list(request.input_images) == [b"\x89PNG fake"]
    assert (request.params.seed, request.params.width) == (3, 48)
    assert (result.seed, result.width) == (3, 48)
    assert [event.WhichOneof("event") for event in seen][0] == "accepted" and len(seen) == 6


@pytest.mark.parametrize("call", ["stream", "generate", "edit"])
def test_a_per_call_timeout_is_the_deadline_of_a_generation(fake, call):
    fake.servicer.steps, fake.servicer.step_delay_s = 100, 0.05

    async def slow():
        async with AsyncBagelClient(fake.address) as client:
            if call == "stream":
                async with client.stream("A cat", timeout=0.4) as events:
                    [event async for event in events]
            elif call == "generate":
                await client.generate("A cat", timeout=0.4)
            else:
                await client.edit(b"\x89PNG", "A cat", timeout=0.4)

    with pytest.raises(DeadlineExceeded) as info:
        run(slow())
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


def test_health_asks_for_the_named_service(fake):
    fake.set_health("SERVING")
    fake.health.set("bagel.v1.Prefill", health_pb2.HealthCheckResponse.ServingStatus.NOT_SERVING)

    async def check():
        async with AsyncBagelClient(fake.address) as client:
            return await client.health(), await client.health("bagel.v1.Prefill")

    assert run(check()) == ("SERVING", "NOT_SERVING")


class RecordingHealth:
    def __init__(self) -> None:
        self.calls = []

    async def Check(self, request, timeout):
        self.calls.append((request, timeout))
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


@pytest.mark.parametrize(
    ("client_timeout", "call_timeout", "deadline"),
    [(None, None, HEALTH_TIMEOUT_S), (2.5, None, 2.5), (2.5, 0.5, 0.5), (None, 0.5, 0.5)],
)
def test_a_health_checks_deadline_is_the_calls_the_clients_or_ten_seconds(
    client_timeout, call_timeout, deadline
):
    health = RecordingHealth()

    async def check():
        async with AsyncBagelClient("127.0.0.1:1", client_timeout) as client:
            client._health = health
            return await client.health("svc", timeout=call_timeout)

    assert run(check()) == "SERVING"
    assert health.calls == [(health_pb2.HealthCheckRequest(service="svc"), deadline)]
    assert HEALTH_TIMEOUT_S == 10.0
