"""`python -m client understand` and `chat`: their flags, the request they send, the answer on
stdout as it comes with the summary line on stderr, and each way a call can fail with its own
message and exit code."""

from __future__ import annotations

import grpc
import pytest

from client import BagelClient
from client.cli import build_parser, main, parse_args
from client.text import understand_request
from tests.client.fake_prefill import FakePrefillServer

SUMMARY = (
    "[length; 17 prompt + 3 completion tokens; prefill 12.3 ms, decode 30.6 ms, total 45.7 ms; "
    "request {}]\n"
)


@pytest.fixture
def fake():
    server = FakePrefillServer()
    yield server
    server.stop()


def flags_of(command: str) -> dict[str, tuple]:
    [commands] = build_parser()._subparsers._group_actions
    return {a.dest: (a.option_strings, a.help) for a in commands.choices[command]._actions}


@pytest.mark.parametrize("command", ["understand", "chat"])
def test_both_commands_take_think_request_id_sampling_and_connection_flags(command):
    flags = flags_of(command)
    assert flags["think"] == (
        ["--think"],
        "reason in <think>...</think> before answering",
    )
    assert flags["request_id"] == (["--request-id"], "unset: the server assigns one")
    assert flags["temperature"][0] == ["--temperature"]
    assert flags["top_k"] == (
        ["--top-k"],
        "with --do-sample: keep the k most likely tokens (0: all) (default: 0)",
    )
    assert flags["server"][0] == ["--server"]
    assert flags["auth_token_file"][0] == ["--auth-token-file"]


def test_understand_takes_an_image_path_and_a_question():
    flags = flags_of("understand")
    assert flags["image"] == ([], "the image (PNG or JPEG)")
    assert flags["question"] == ([], None)
    args = parse_args(["understand", "in.png", "What is it?"])
    assert args.image.name == "in.png" and args.image.suffix == ".png"
    assert (args.question, args.think, args.request_id) == ("What is it?", False, None)


def test_chat_takes_a_message_and_an_optional_system_message():
    flags = flags_of("chat")
    assert flags["message"] == ([], None)
    assert flags["system"] == (["--system"], "a system message before it")
    args = parse_args(["chat", "Hi", "--system", "Be brief.", "--think", "--request-id", "r"])
    assert (args.message, args.system, args.think, args.request_id) == (
        "Hi",
        "Be brief.",
        True,
        "r",
    )
    assert parse_args(["chat", "Hi"]).system is None


def test_chat_prints_the_answer_and_a_summary_line(fake, capsys):
    code = main(["chat", "Hello", "--server", fake.address, "--request-id", "cli-1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out == "The cat sleeps.\n"
    assert captured.err == SUMMARY.format("cli-1")
    [request] = fake.servicer.understand_requests
    assert request == understand_request([("user", "Hello")], think=False, request_id="cli-1")


def test_chat_sends_the_system_message_first_and_every_flag(fake, capsys):
    argv = ["chat", "Hello", "--system", "Be brief.", "--think", "--do-sample"]
    argv += ["--temperature", "0.5", "--top-p", "0.75", "--top-k", "7", "--seed", "3"]
    argv += ["--max-new-tokens", "20", "--server", fake.address]
    assert main(argv) == 0
    assert capsys.readouterr().err == SUMMARY.format("srv-2")
    [request] = fake.servicer.understand_requests
    want = understand_request(
        [("system", "Be brief."), ("user", "Hello")],
        think=True,
        do_sample=True,
        temperature=0.5,
        top_p=0.75,
        top_k=7,
        seed=3,
        max_new_tokens=20,
    )
    assert request == want
    assert not request.HasField("request_id")


def test_an_empty_system_message_is_left_out(fake, capsys):
    assert main(["chat", "Hello", "--system", "", "--server", fake.address]) == 0
    [request] = fake.servicer.understand_requests
    assert [m.role for m in request.messages] == ["user"]


def test_understand_sends_the_image_file_and_the_question(fake, tmp_path, capsys):
    image = tmp_path / "in.png"
    image.write_bytes(b"\x89PNG picture")
    code = main(["understand", str(image), "What is it?", "--top-k", "2", "--server", fake.address])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (captured.out, captured.err) == ("The cat sleeps.\n", SUMMARY.format("srv-2"))
    [request] = fake.servicer.understand_requests
    assert request == understand_request(
        [("user", [b"\x89PNG picture", "What is it?"])], top_k=2, think=False
    )


def test_the_answer_is_written_as_each_delta_arrives(fake, monkeypatch, capsys):
    written = []
    real_chat = BagelClient.chat

    def chat(self, messages, *, on_text, **params):
        def spy(text):
            on_text(text)
            written.append(capsys.readouterr().out)  # already on stdout when the delta returns

        return real_chat(self, messages, on_text=spy, **params)

    monkeypatch.setattr(BagelClient, "chat", chat)
    assert main(["chat", "Hello", "--server", fake.address]) == 0
    assert written == ["The ", "cat", " sleeps."]


def test_an_image_that_cannot_be_read_is_exit_2_naming_the_file(fake, tmp_path, capsys):
    missing = tmp_path / "missing.png"
    assert main(["understand", str(missing), "What?", "--server", fake.address]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: cannot read {missing}: No such file or directory\n"
    assert captured.out == "" and fake.servicer.understand_requests == []


def test_a_failed_call_is_exit_1_with_its_status_and_details(fake, capsys):
    fake.servicer.fail_with = (grpc.StatusCode.INVALID_ARGUMENT, "the question is empty")
    assert main(["chat", "Hello", "--server", fake.address]) == 1
    assert capsys.readouterr().err == "\nerror: INVALID_ARGUMENT: the question is empty\n"


def test_a_status_after_the_answer_is_exit_1(fake, capsys):
    fake.servicer.fail_after_answer = (grpc.StatusCode.DATA_LOSS, "bad trailer")
    assert main(["chat", "Hello", "--server", fake.address]) == 1
    captured = capsys.readouterr()
    assert captured.out == "The cat sleeps."
    assert captured.err == "\nerror: DATA_LOSS: bad trailer\n"


def test_a_stream_without_a_final_event_is_exit_1_internal(fake, capsys):
    fake.servicer.finish = False
    assert main(["chat", "Hello", "--server", fake.address, "--request-id", "r-4"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "The cat sleeps."
    assert captured.err == "\nerror: INTERNAL: request r-4 ended without a final event\n"


def test_a_value_the_wire_cannot_carry_is_exit_2_invalid_argument(fake, capsys):
    assert main(["chat", "Hello", "--top-k", "-1", "--server", fake.address]) == 2
    assert capsys.readouterr().err == "error: INVALID_ARGUMENT: Value out of range: -1\n"
    assert fake.servicer.understand_requests == []


def test_a_bad_value_type_is_exit_2_invalid_argument(fake, monkeypatch, capsys):
    def typed(self, messages, **params):
        raise TypeError("think must be a bool, got 1")

    monkeypatch.setattr(BagelClient, "chat", typed)
    assert main(["chat", "Hello", "--server", fake.address]) == 2
    assert capsys.readouterr().err == "error: INVALID_ARGUMENT: think must be a bool, got 1\n"


def test_a_token_file_that_cannot_be_used_is_exit_2(fake, tmp_path, capsys):
    token = tmp_path / "token"
    token.write_text("   \n")
    code = main(["chat", "Hello", "--server", fake.address, "--auth-token-file", str(token)])
    assert code == 2
    assert capsys.readouterr().err == f"error: the token file {token} is empty\n"


@pytest.mark.parametrize("command", [["chat", "Hello"], ["understand", "in.png", "What?"]])
def test_an_interrupt_is_exit_130_cancelled(monkeypatch, capsys, tmp_path, command):
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    (tmp_path / "in.png").write_bytes(b"\x89PNG")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(BagelClient, "chat", interrupted)
    monkeypatch.setattr(BagelClient, "understand", interrupted)
    assert main(command) == 130
    assert capsys.readouterr().err == "\nerror: CANCELLED: interrupted\n"
