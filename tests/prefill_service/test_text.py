"""The prefill service's text side over real gRPC: Understand answers equal in-process decoding
(text, and an image through the ViT), concurrent requests are decoded together and each gets
its solo answer, bad requests are INVALID_ARGUMENT naming the fault, a cancelled request leaves
the batch, and think + generate / edit send the plan first and the three contexts that reach
the diffusion service equal `Pipeline`'s bit for bit."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from PIL import Image

from bagel.network.kv import Branch
from bagel.pipeline import Pipeline
from bagel.prompting.contexts import mixed_sequence, next_rope_position, prepare_edit_image
from bagel.prompting.conversation import understanding_segments
from bagel.text.decoding import Sampling, decode
from bagel.text.tokenizer import PROMPT_END_TOKEN
from client import AsyncBagelClient, BagelClient
from client.cli import main as cli_main
from prefill_service.mock import SyntheticKV
from prefill_service.prefill import LanguageModelKV
from prefill_service.settings import PrefillSettings
from protos import PREFILL_SERVICE, UnderstandRequest
from serving.params import GenerationParams
from tests.prefill_service.conftest import RunningPrefill
from tests.prefill_service.fake_diffusion import FakeDiffusion
from tests.prefill_service.test_edit import RULES, png

SMALL = {"height": 32, "width": 48, "num_timesteps": 4}


@pytest.fixture(scope="module")
def text_source(tiny_model_dir: Path) -> LanguageModelKV:
    return LanguageModelKV(tiny_model_dir, "cpu", edit_resize=RULES)


@pytest.fixture(scope="module")
def text_prefill(
    loop_thread, tiny_model_dir: Path, fake_diffusion_server: FakeDiffusion, text_source
) -> Iterator[RunningPrefill]:
    settings = PrefillSettings(
        model_dir=str(tiny_model_dir),
        listen="127.0.0.1:0",
        diffusion=fake_diffusion_server.address,
        chunk_size=4096,
    )
    running = RunningPrefill(loop_thread, settings, text_source)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir: Path) -> Pipeline:
    return Pipeline(tiny_model_dir, "cpu")


def solo_answer(source: LanguageModelKV, parts, sampling: Sampling, image=None) -> str:
    """The answer decoded in process, alone, as text without its end token."""
    segments = understanding_segments(source.tokenizer, parts, think=False)
    images = source.contexts.vit_embeddings(image) if image is not None else {}
    prompt = mixed_sequence(source.model, segments, images)
    end = source.tokenizer.special_ids[PROMPT_END_TOKEN]
    decoded = decode(source.model, prompt, next_rope_position(segments), sampling, end)
    tokens = decoded.tokens[:-1] if decoded.finish == "stop" else decoded.tokens
    return source.tokenizer.decode(tokens)


def test_chat_answer_equals_in_process_decoding_with_usage(text_prefill, text_source):
    message = "a red circle on a white background"
    with BagelClient(text_prefill.address, timeout=60) as client:
        deltas: list[str] = []
        result = client.chat(message, max_new_tokens=64, on_text=deltas.append)
    assert result.text == "".join(deltas) == solo_answer(text_source, [message], Sampling(64))
    assert result.finish_reason in ("stop", "length")
    prompt_ids = text_source.tokenizer.encode_prompt(message)
    assert result.prompt_tokens == len(prompt_ids) + 1  # and the <|im_start|> decoding starts at
    assert 1 <= result.completion_tokens <= 64
    assert result.timings["prefill_ms"] > 0 and result.timings["decode_ms"] >= 0


def test_understanding_an_image_sees_it_through_the_vit_only(text_prefill, text_source):
    image = png(90, 60, seed=4)
    question = "what shape is this?"
    with BagelClient(text_prefill.address, timeout=60) as client:
        result = client.understand(image, question, max_new_tokens=48)
    edit_image = prepare_edit_image(Image.open(io.BytesIO(image)), RULES)
    vit_segment = edit_image.segments(text_source.config)[1:]
    expected = solo_answer(text_source, [vit_segment, question], Sampling(48), edit_image)
    assert result.text == expected
    assert (
        result.prompt_tokens
        == vit_segment[0].num_tokens + len(text_source.tokenizer.encode_prompt(question)) + 1
    )
    # the image changes the answer's context: without it the tokens differ
    assert expected != solo_answer(text_source, [question], Sampling(48))


def test_concurrent_requests_are_decoded_together_and_each_gets_its_solo_answer(
    text_prefill, text_source
):
    jobs = {i: (f"a shape number {i} " + "big " * i, 20 + 9 * i) for i in range(6)}
    answers: dict[int, str] = {}
    errors: list[BaseException] = []
    scheduler = text_prefill.server.servicer.text.scheduler(text_source)
    steps_before = scheduler.steps

    def ask(i: int) -> None:
        try:
            with BagelClient(text_prefill.address, timeout=120) as client:
                message, length = jobs[i]
                answers[i] = client.chat(message, max_new_tokens=length).text
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert errors == []
    for i, (message, length) in jobs.items():
        assert answers[i] == solo_answer(text_source, [message], Sampling(length)), i
    # Decoded together: far fewer steps than the requests' tokens one after another.
    steps = scheduler.steps - steps_before
    assert steps < sum(length for _, length in jobs.values()) * 0.8


def test_seeded_sampling_through_the_service_is_reproducible(text_prefill):
    settings = {"max_new_tokens": 24, "do_sample": True, "temperature": 1.3, "top_k": 40}
    with BagelClient(text_prefill.address, timeout=60) as client:
        first = client.chat("a blue square", seed=9, **settings).text
        again = client.chat("a blue square", seed=9, **settings).text
        other = client.chat("a blue square", seed=10, **settings).text
    assert first == again != other


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"messages": []}, "messages is empty"),
        (
            {"messages": [{"role": "robot", "content": [{"text": "hi"}]}]},
            "messages[0].role='robot' must be one of system, user, assistant",
        ),
        (
            {"messages": [{"role": "user", "content": [{"image": b"GIF89a...."}]}]},
            "messages[0].content[0].image is not a PNG or JPEG image",
        ),
        (
            {
                "messages": [{"role": "user", "content": [{"text": "hi"}]}],
                "sampling": {"do_sample": True, "temperature": 0.0},
            },
            "temperature=0.0 must be > 0 when do_sample is on",
        ),
        (
            {
                "messages": [{"role": "user", "content": [{"text": "hi"}]}],
                "sampling": {"do_sample": True, "top_p": 1.5},
            },
            "top_p=1.5 must be in (0, 1]",
        ),
        (
            {
                "messages": [{"role": "user", "content": [{"text": "hi"}]}],
                "sampling": {"max_new_tokens": 9000},
            },
            "tokens, more than the 8192 this service decodes per request",
        ),
        (
            {
                "messages": [{"role": "user", "content": [{"text": "hi"}]}],
                "sampling": {"max_new_tokens": 0},
            },
            "max_new_tokens=0 must be in [1, 32768]",
        ),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_fault(text_prefill, request_fields, message):
    request = UnderstandRequest(**request_fields)
    with grpc.insecure_channel(text_prefill.address) as channel:
        call = channel.unary_stream(
            f"/{PREFILL_SERVICE}/Understand",
            request_serializer=UnderstandRequest.SerializeToString,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as raised:
            list(call(request, timeout=30))
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in raised.value.details()
    with BagelClient(text_prefill.address, timeout=30) as client:  # still serving
        assert client.chat("hi", max_new_tokens=2).completion_tokens >= 1


def test_undecodable_bytes_are_invalid_argument(text_prefill):
    with grpc.insecure_channel(text_prefill.address) as channel:
        call = channel.unary_stream(f"/{PREFILL_SERVICE}/Understand")
        with pytest.raises(grpc.RpcError) as raised:
            list(call(b"\xff\xff\xff", timeout=30))
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid UnderstandRequest" in raised.value.details()


def test_a_cancelled_request_leaves_the_batch_and_others_keep_decoding(text_prefill, text_source):
    scheduler = text_prefill.server.servicer.text.scheduler(text_source)
    with BagelClient(text_prefill.address, timeout=120) as client:
        stream = client.understand_stream([("user", "a long answer")], max_new_tokens=4000)
        deltas = 0
        for event in stream:
            deltas += event.WhichOneof("event") == "delta"
            if deltas >= 3:
                break
        assert len(scheduler.decoder.active) == 1
        stream.cancel()
        deadline = time.monotonic() + 10
        while scheduler.decoder.active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not scheduler.decoder.active
        assert client.chat("hi", max_new_tokens=3).completion_tokens >= 1


def arrived(fake: FakeDiffusion) -> dict[Branch, object]:
    [call] = fake.calls
    return {Branch(c.kind): c for c in call.received.cache.contexts}


def assert_contexts_equal(received: dict, expected: dict) -> None:
    assert list(received) == [Branch.COND, Branch.UNCOND_TEXT, Branch.UNCOND_IMG]
    for branch, got in received.items():
        want = expected[branch]
        assert got.num_tokens == want.num_tokens, branch
        assert got.next_rope_position == want.next_rope_position, branch
        for layer in range(len(want.keys)):
            assert torch.equal(got.keys[layer], want.keys[layer]), (branch, layer)
            assert torch.equal(got.values[layer], want.values[layer]), (branch, layer)


@pytest.mark.parametrize("negative", ["", "blurry"])
def test_think_generate_sends_the_plan_first_and_pipeline_contexts_bit_for_bit(
    text_prefill, fake_diffusion, pipeline, negative
):
    prompt = "a green triangle on a black background"
    kinds: list[str] = []
    with BagelClient(text_prefill.address, timeout=120) as client:
        result = client.generate(
            prompt,
            think=True,
            think_max_new_tokens=24,
            negative_prompt=negative,
            seed=1,
            on_event=lambda e: kinds.append(e.WhichOneof("event")),
            **SMALL,
        )
    plan = pipeline.plan(prompt, Sampling(24))
    assert result.thinking == plan and plan
    first_other = next(i for i, k in enumerate(kinds) if k != "thinking")
    assert set(kinds[:first_other]) == {"thinking"} and "thinking" not in kinds[first_other:]
    expected = pipeline.think_contexts(prompt, plan, negative)
    assert_contexts_equal(arrived(fake_diffusion), expected)
    # the plan goes into cond alone: uncond_img is cond without it
    ctx = arrived(fake_diffusion)
    assert ctx[Branch.COND].num_tokens > ctx[Branch.UNCOND_IMG].num_tokens


def test_think_edit_puts_the_image_before_the_prompt_and_matches_the_pipeline(
    text_prefill, fake_diffusion, pipeline
):
    image = png(90, 60, seed=2)
    prompt = "make it blue"
    with BagelClient(text_prefill.address, timeout=120) as client:
        result = client.edit(image, prompt, think=True, think_max_new_tokens=16, seed=2)
    edit_image = pipeline.edit_image(Image.open(io.BytesIO(image)), RULES)
    plan = pipeline.plan(prompt, Sampling(16), edit_image)
    assert result.thinking == plan
    expected = pipeline.think_contexts(prompt, plan, "", edit_image)
    assert_contexts_equal(arrived(fake_diffusion), expected)


def test_think_with_bad_sampling_is_invalid_argument_before_any_plan(text_prefill, fake_diffusion):
    client = BagelClient(text_prefill.address, timeout=30)
    with client, pytest.raises(grpc.RpcError) as raised:
        client.generate("a cat", think=True, think_do_sample=True, think_top_p=0.0, **SMALL)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "top_p=0.0 must be in (0, 1]" in raised.value.details()
    assert fake_diffusion.calls == []


def test_pipeline_think_uses_its_plan_and_generates(pipeline):
    params = GenerationParams(seed=3, **SMALL)
    thought = pipeline.generate("a red circle", params, think=Sampling(8))
    plain = pipeline.generate("a red circle", params)
    assert thought.plan == pipeline.plan("a red circle", Sampling(8))
    assert not torch.equal(thought.latents, plain.latents)


def test_the_async_client_answers_as_the_sync_one(text_prefill):
    async def ask() -> tuple[str, str, list[str]]:
        deltas: list[str] = []
        async with AsyncBagelClient(text_prefill.address, timeout=60) as client:
            chat = await client.chat("a red circle", max_new_tokens=16, on_text=deltas.append)
            seen = await client.understand(png(90, 60, seed=4), "what?", max_new_tokens=8)
        return chat.text, seen.text, deltas

    chat, seen, deltas = asyncio.run(ask())
    with BagelClient(text_prefill.address, timeout=60) as client:
        assert chat == client.chat("a red circle", max_new_tokens=16).text == "".join(deltas)
        assert seen == client.understand(png(90, 60, seed=4), "what?", max_new_tokens=8).text


def test_a_source_without_a_language_model_head_says_so(
    loop_thread, tiny_model_dir, fake_diffusion
):
    settings = PrefillSettings(
        model_dir=str(tiny_model_dir), listen="127.0.0.1:0", diffusion=fake_diffusion.address
    )
    running = RunningPrefill(loop_thread, settings, SyntheticKV(tiny_model_dir, torch.float32))
    try:
        with BagelClient(running.address, timeout=30) as client:
            with pytest.raises(grpc.RpcError) as chat:
                client.chat("hi")
            with pytest.raises(grpc.RpcError) as think:
                client.generate("a cat", think=True, **SMALL)
    finally:
        running.stop()
    for raised in (chat, think):
        assert raised.value.code() is grpc.StatusCode.UNIMPLEMENTED
        assert "does not decode text" in raised.value.details()
    assert fake_diffusion.calls == []


def test_the_cli_prints_the_answer_and_the_plan(text_prefill, fake_diffusion, tmp_path, capsys):
    server = ["--server", text_prefill.address, "--timeout", "60"]
    assert cli_main(["chat", "a red circle", "--max-new-tokens", "12", *server]) == 0
    printed = capsys.readouterr()
    with BagelClient(text_prefill.address, timeout=60) as client:
        answer = client.chat("a red circle", max_new_tokens=12)
    assert printed.out == answer.text + "\n"
    assert f"{answer.completion_tokens} completion tokens" in printed.err
    image = tmp_path / "in.png"
    image.write_bytes(png(90, 60, seed=4))
    assert cli_main(["understand", str(image), "what?", "--max-new-tokens", "6", *server]) == 0
    assert capsys.readouterr().out.strip()
    out = tmp_path / "x.png"
    argv = ["generate", "a cat", "-o", str(out), "--think", "--think-max-new-tokens", "8"]
    assert cli_main([*argv, "--height", "32", "--width", "48", "--steps", "4", *server]) == 0
    printed = capsys.readouterr()
    with BagelClient(text_prefill.address, timeout=60) as client:
        plan = client.generate("a cat", think=True, think_max_new_tokens=8, **SMALL).thinking
    assert f"plan: {plan}\n" in printed.out and out.is_file()
