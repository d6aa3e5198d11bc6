"""`AsyncBagelClient` against the fake Prefill server: the same requests and results as
`BagelClient` (images and text), cancellation that the server sees, deadlines, health and the
bearer token."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from client import AsyncBagelClient, BagelClient, IncompleteAnswer, IncompleteGeneration
from client.text import understand_request
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

    with pytest.raises(grpc.aio.AioRpcError) as info:
        run(failing())
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details() == "queue is full"


def test_a_deadline_gives_deadline_exceeded(fake):
    fake.servicer.steps, fake.servicer.step_delay_s = 100, 0.05

    async def slow():
        async with AsyncBagelClient(fake.address, timeout=0.5) as client:
            await client.generate("A cute cat")

    with pytest.raises(grpc.aio.AioRpcError) as info:
        run(slow())
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


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

    with pytest.raises(grpc.aio.AioRpcError) as info:
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

    with pytest.raises(grpc.aio.AioRpcError) as info:
        run(slow())
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_token_travels_with_a_text_call(fake):
    async def chat():
        async with AsyncBagelClient(fake.address, auth_token="tok-2") as client:
            await client.chat("hi")

    run(chat())
    assert ("authorization", "Bearer tok-2") in fake.servicer.metadata
