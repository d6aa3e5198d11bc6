"""`client.text` and `BagelClient`'s text calls: the `UnderstandRequest` built from a
conversation and keyword arguments (every field, unset ones left unset, bad ones refused with
their message), the answer collected from the events, and chat/understand against the fake
Prefill server (deltas as they come, deadlines, a status after the answer)."""

from __future__ import annotations

import io
import time

import grpc
import pytest
from PIL import Image as PILImage

from client import BagelClient, IncompleteAnswer, TextResult
from client.errors import DataLoss, DeadlineExceeded, ResourceExhausted
from client.text import SAMPLING_NAMES, TEXT_PARAM_NAMES, collect_answer, understand_request
from protos import (
    Accepted,
    ChatMessage,
    ContentPart,
    TextDelta,
    TextFinished,
    UnderstandEvent,
    Usage,
    params_pb2,
)
from tests.client.fake_prefill import ANSWER_TIMINGS, FakePrefillServer


@pytest.fixture
def fake():
    server = FakePrefillServer()
    yield server
    server.stop()


def test_the_keyword_arguments_are_the_sampling_fields_think_and_request_id():
    sampling = {"max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "seed"}
    assert sampling == SAMPLING_NAMES
    assert sampling | {"think", "request_id"} == TEXT_PARAM_NAMES


def test_a_conversation_becomes_messages_in_order_with_their_roles_and_parts():
    request = understand_request(
        [("system", "Be brief."), ("user", [b"\x89PNG a", "what is it?"]), ("assistant", "A cat.")]
    )
    assert list(request.messages) == [
        ChatMessage(role="system", content=[ContentPart(text="Be brief.")]),
        ChatMessage(
            role="user", content=[ContentPart(image=b"\x89PNG a"), ContentPart(text="what is it?")]
        ),
        ChatMessage(role="assistant", content=[ContentPart(text="A cat.")]),
    ]


def test_one_str_is_one_text_part_and_one_image_one_image_part(tmp_path):
    path = tmp_path / "in.png"
    path.write_bytes(b"\x89PNG from a file")
    pil = PILImage.new("RGB", (3, 2), (200, 100, 50))
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    cases = [
        ("just text", ContentPart(text="just text")),
        (b"\x89PNG bytes", ContentPart(image=b"\x89PNG bytes")),
        (path, ContentPart(image=b"\x89PNG from a file")),
        (pil, ContentPart(image=buffer.getvalue())),
    ]
    for content, part in cases:
        [message] = understand_request([("user", content)]).messages
        assert list(message.content) == [part]
    parts = understand_request([("user", ("a", b"\x89PNG b", str(path)))]).messages[0].content
    assert [p.WhichOneof("part") for p in parts] == ["text", "image", "text"]
    assert parts[2].text == str(path)  # in a list, a str is text, never a path


def test_an_input_image_of_another_type_is_refused():
    with pytest.raises(TypeError, match="an input image must be bytes, a path or a PIL image"):
        understand_request([("user", [3])])


def test_every_keyword_argument_sets_its_field():
    request = understand_request(
        [("user", "hi")],
        max_new_tokens=64,
        do_sample=True,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        seed=11,
        think=True,
        request_id="r-1",
    )
    assert request.sampling == params_pb2.TextSampling(
        max_new_tokens=64, do_sample=True, temperature=0.7, top_p=0.9, top_k=40, seed=11
    )
    assert request.HasField("think") and request.think is True
    assert request.HasField("request_id") and request.request_id == "r-1"


def test_none_and_missing_keyword_arguments_leave_their_fields_unset():
    for request in (
        understand_request([("user", "hi")]),
        understand_request([("user", "hi")], **dict.fromkeys(TEXT_PARAM_NAMES)),
    ):
        assert request.sampling == params_pb2.TextSampling()
        assert not request.HasField("think") and not request.HasField("request_id")
    some = understand_request([("user", "hi")], top_k=5, seed=None, temperature=None)
    assert some.sampling == params_pb2.TextSampling(top_k=5)
    assert not some.sampling.HasField("seed")


def test_false_think_and_an_empty_request_id_are_sent_as_set():
    request = understand_request([("user", "hi")], think=False, request_id="")
    assert request.HasField("think") and request.think is False
    assert request.HasField("request_id") and request.request_id == ""


def test_unknown_keyword_arguments_are_all_named_sorted():
    with pytest.raises(TypeError) as info:
        understand_request([("user", "hi")], width=3, steps=2, top_k=1)
    assert str(info.value) == "unexpected keyword argument(s): steps, width"


@pytest.mark.parametrize(
    ("params", "error", "message"),
    [
        ({"think": 1}, TypeError, "think must be a bool, got 1"),
        ({"think": "yes"}, TypeError, "think must be a bool, got 'yes'"),
        ({"request_id": 7}, TypeError, "request_id must be a str, got 7"),
        ({"temperature": "x"}, TypeError, "temperature must be a number, got 'x'"),
        ({"top_k": -1}, ValueError, "Value out of range: -1"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_with_its_name(params, error, message):
    with pytest.raises(error) as info:
        understand_request([("user", "hi")], **params)
    assert str(info.value) == message


def accepted(request_id: str) -> UnderstandEvent:
    return UnderstandEvent(accepted=Accepted(request_id=request_id))


def delta(text: str) -> UnderstandEvent:
    return UnderstandEvent(delta=TextDelta(text=text))


def finished(reason: str = "stop", prompt: int = 9, completion: int = 2) -> UnderstandEvent:
    usage = Usage(prompt_tokens=prompt, completion_tokens=completion)
    done = TextFinished(
        finish_reason=reason, usage=usage, prefill_ms=1.5, decode_ms=2.25, total_ms=4.0
    )
    return UnderstandEvent(finished=done)


def test_the_answer_joins_the_deltas_and_takes_the_final_events_fields():
    seen = []
    events = [
        accepted("req-9"),
        delta("Hel"),
        delta("lo"),
        delta(", cat"),
        finished("length", 31, 3),
    ]
    result = collect_answer(iter(events), seen.append)
    assert result == TextResult(
        text="Hello, cat",
        finish_reason="length",
        prompt_tokens=31,
        completion_tokens=3,
        timings={"prefill_ms": 1.5, "decode_ms": 2.25, "total_ms": 4.0},
        request_id="req-9",
    )
    assert seen == ["Hel", "lo", ", cat"]


def test_an_answer_without_accepted_or_deltas_has_empty_text_and_id():
    result = collect_answer([finished()])
    assert (result.text, result.request_id, result.finish_reason) == ("", "", "stop")
    assert (result.prompt_tokens, result.completion_tokens) == (9, 2)


def test_a_text_result_starts_without_timings_or_request_id():
    result = TextResult(text="a", finish_reason="stop", prompt_tokens=1, completion_tokens=1)
    assert result.timings == {} and result.request_id == ""
    assert TextResult("a", "stop", 1, 1).timings is not result.timings


def test_the_events_are_read_to_the_end():
    read = []

    def events():
        for event in (accepted("r"), delta("a"), finished(), delta("late")):
            read.append(event.WhichOneof("event"))
            yield event

    assert collect_answer(events()).text == "a"  # a delta after the end is not part of it
    assert read == ["accepted", "delta", "finished", "delta"]


def test_a_stream_without_a_final_event_raises_incomplete_answer_naming_the_request():
    with pytest.raises(IncompleteAnswer) as info:
        collect_answer([accepted("req-3"), delta("half")])
    assert str(info.value) == "request req-3 ended without a final event"
    with pytest.raises(IncompleteAnswer) as info:
        collect_answer([delta("half")])
    assert str(info.value) == "request ? ended without a final event"
    assert issubclass(IncompleteAnswer, RuntimeError)


def test_chat_sends_one_user_message_and_returns_the_servers_answer(fake):
    seen = []
    with BagelClient(fake.address, timeout=10) as client:
        result = client.chat("Hi there", on_text=seen.append, top_k=3, think=False)
    assert result == TextResult(
        text="The cat sleeps.",
        finish_reason="length",
        prompt_tokens=17,
        completion_tokens=3,
        timings=ANSWER_TIMINGS,
        request_id="srv-2",
    )
    assert seen == ["The ", "cat", " sleeps."]
    [request] = fake.servicer.understand_requests
    assert request == understand_request([("user", "Hi there")], top_k=3, think=False)


def test_chat_sends_a_conversation_as_it_is_given(fake):
    conversation = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "?")]
    with BagelClient(fake.address, timeout=10) as client:
        result = client.chat(conversation, request_id="mine")
    assert result.request_id == "mine" and result.text == "The cat sleeps."
    [request] = fake.servicer.understand_requests
    assert request == understand_request(conversation, request_id="mine")


def test_understand_sends_the_image_then_the_question_in_one_user_message(fake):
    seen = []
    with BagelClient(fake.address, timeout=10) as client:
        result = client.understand(b"\x89PNG img", "What is it?", on_text=seen.append, seed=5)
    assert result.text == "The cat sleeps." and seen == ["The ", "cat", " sleeps."]
    [request] = fake.servicer.understand_requests
    assert list(request.messages) == [
        ChatMessage(
            role="user",
            content=[ContentPart(image=b"\x89PNG img"), ContentPart(text="What is it?")],
        )
    ]
    assert request.sampling == params_pb2.TextSampling(seed=5)


def test_understand_stream_yields_the_raw_events(fake):
    with BagelClient(fake.address, timeout=10) as client:
        stream = client.understand_stream([("user", "hi")], request_id="raw")
        kinds = [event.WhichOneof("event") for event in stream]
        assert stream.request_id == "raw"
    assert kinds == ["accepted", "delta", "delta", "delta", "finished"]


def test_a_failed_text_call_raises_its_typed_error(fake):
    fake.servicer.fail_with = (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full")
    with BagelClient(fake.address, timeout=10) as client, pytest.raises(ResourceExhausted) as info:
        client.chat("hi")
    assert info.value.details() == "queue is full"


def test_a_status_after_the_final_event_still_raises_with_the_request_id(fake):
    fake.servicer.fail_after_answer = (grpc.StatusCode.DATA_LOSS, "trailer mismatch")
    with BagelClient(fake.address, timeout=10) as client, pytest.raises(DataLoss) as info:
        client.chat("hi")
    assert info.value.details() == "trailer mismatch" and info.value.request_id == "srv-2"


def test_a_stream_without_a_final_event_raises_incomplete_answer(fake):
    fake.servicer.finish = False
    with BagelClient(fake.address, timeout=10) as client, pytest.raises(IncompleteAnswer) as info:
        client.chat("hi")
    assert str(info.value) == "request srv-2 ended without a final event"


SLOW_ANSWER = ["word "] * 40  # 2 s at 0.05 s a delta


@pytest.mark.parametrize("call", ["chat", "understand", "understand_stream"])
def test_a_per_call_timeout_is_the_calls_deadline(fake, call):
    fake.servicer.answer, fake.servicer.step_delay_s = SLOW_ANSWER, 0.05
    start = time.monotonic()
    with BagelClient(fake.address) as client, pytest.raises(DeadlineExceeded):
        if call == "chat":
            client.chat("hi", timeout=0.4)
        elif call == "understand":
            client.understand(b"\x89PNG", "hi", timeout=0.4)
        else:
            list(client.understand_stream([("user", "hi")], timeout=0.4))
    assert time.monotonic() - start < 1.5


def test_the_clients_timeout_is_the_default_deadline_of_a_text_call(fake):
    fake.servicer.answer, fake.servicer.step_delay_s = SLOW_ANSWER, 0.05
    with BagelClient(fake.address, timeout=0.4) as client, pytest.raises(DeadlineExceeded):
        client.chat("hi")
