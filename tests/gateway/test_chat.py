"""`POST /v1/chat/completions` through the gateway, the prefill service and the trained tiny
checkpoint, driven by the official `openai` SDK: answers equal in-process greedy decoding, a
stream's chunks add up to the same answer with usage, images travel as data URLs, think rides in
`extra_body`, and every bad request is OpenAI's error JSON naming the fault."""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest
import torch
from PIL import Image

from bagel.prompting.contexts import mixed_sequence, next_rope_position, prepare_edit_image
from bagel.prompting.conversation import understanding_segments
from bagel.text.decoding import Sampling, decode
from bagel.text.tokenizer import PROMPT_END_TOKEN
from client import BagelClient
from gateway.settings import GatewaySettings
from prefill_service.prefill import LanguageModelKV
from tests.gateway.conftest import MODEL

MODEL_NAME = GatewaySettings.model_name
QUESTION = "what shape is on the white background?"


@pytest.fixture(scope="module")
def source() -> LanguageModelKV:
    return LanguageModelKV(MODEL, "cpu", dtype=torch.float32)


def in_process(source: LanguageModelKV, parts, length: int, think: bool = False, image=None):
    segments = understanding_segments(source.tokenizer, parts, think)
    images = source.contexts.vit_embeddings(image) if image is not None else {}
    prompt = mixed_sequence(source.model, segments, images)
    end = source.tokenizer.special_ids[PROMPT_END_TOKEN]
    decoded = decode(source.model, prompt, next_rope_position(segments), Sampling(length), end)
    tokens = decoded.tokens[:-1] if decoded.finish == "stop" else decoded.tokens
    return source.tokenizer.decode(tokens), prompt.embeddings.shape[0], decoded


def png_data_url(seed: int = 1) -> tuple[str, bytes]:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode(), data


def test_a_chat_answer_equals_in_process_greedy_decoding_with_usage(sdk, source):
    answer = sdk.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=24,
    )
    text, prompt_tokens, decoded = in_process(source, [QUESTION], 24)
    [choice] = answer.choices
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.finish_reason == decoded.finish
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    assert answer.usage.prompt_tokens == prompt_tokens
    assert answer.usage.completion_tokens == len(decoded.tokens)
    assert answer.usage.total_tokens == prompt_tokens + len(decoded.tokens)


def test_a_stream_of_chunks_adds_up_to_the_answer_and_ends_with_usage(sdk, source):
    chunks = list(
        sdk.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text, prompt_tokens, decoded = in_process(source, [QUESTION], 24)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == decoded.finish and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == prompt_tokens
    assert chunks[-1].usage.completion_tokens == len(decoded.tokens)


def test_an_image_as_a_data_url_is_seen_through_the_vit(sdk, prefill, source):
    url, data = png_data_url()
    answer = sdk.chat.completions.create(
        model=MODEL_NAME,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": QUESTION},
                ],
            }
        ],
        max_tokens=16,
    )
    image = prepare_edit_image(Image.open(io.BytesIO(data)), source.edit_resize)
    vit_segment = image.segments(source.config)[1:]
    text, prompt_tokens, _ = in_process(source, [vit_segment, QUESTION], 16, image=image)
    assert answer.choices[0].message.content == text
    assert answer.usage.prompt_tokens == prompt_tokens
    with BagelClient(prefill.address, timeout=60) as client:
        assert client.understand(data, QUESTION, max_new_tokens=16).text == text


def test_think_and_sampling_ride_as_extra_fields(sdk, prefill, source):
    messages = [{"role": "user", "content": "a circle"}]
    thought = sdk.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=12, extra_body={"think": True}
    )
    text, _, _ = in_process(source, ["a circle"], 12, think=True)
    assert thought.choices[0].message.content == text
    sampled = [
        sdk.chat.completions.create(
            model=MODEL_NAME,
            messages=messages,
            max_tokens=12,
            temperature=1.2,
            seed=5,
            extra_body={"top_k": 30},
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    with BagelClient(prefill.address, timeout=60) as client:
        expected = client.chat(
            "a circle", max_new_tokens=12, do_sample=True, temperature=1.2, seed=5, top_k=30
        ).text
    assert sampled == [expected, expected]


@pytest.mark.parametrize(
    ("kwargs", "status", "message", "param"),
    [
        (
            {"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]},
            400, "must be a data URL", "messages.0.content.0.image_url.url",
        ),
        (
            {"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]},
            400, "is not valid base64", "messages.0.content.0.image_url.url",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
                "url": "data:image/gif;base64," + base64.b64encode(b"GIF89a....").decode()}}]}]},
            400, "is not a PNG or JPEG image", None,
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}], "temperature": 1.0, "top_p": 2.0},
            400, "top_p=2.0 must be in (0, 1]", None,
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100_000},
            400, "max_new_tokens=100000 must be in [1, 32768]", None,
        ),
        ({"messages": []}, 400, "messages", "messages"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"},
            404, "the model 'gpt-4o' does not exist", "model",
        ),
    ],
)  # fmt: skip
def test_bad_requests_are_openai_errors_naming_the_fault(sdk, kwargs, status, message, param):
    with pytest.raises(openai.APIStatusError) as raised:
        sdk.chat.completions.create(**{"model": MODEL_NAME, **kwargs})
    error = raised.value
    assert error.status_code == status
    assert message in error.body["message"]
    if param is not None:
        assert error.body["param"] == param
    # and the service goes on answering
    assert sdk.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    ).choices


def test_unknown_fields_are_refused(gateway):
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stop": ["x"]}).encode()
    request = urllib.request.Request(
        f"{gateway.url}/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=30)
    assert raised.value.code == 400
    assert json.loads(raised.value.read())["error"]["message"] == "unknown field 'stop'"
