"""`python -m client`: its help says what each flag does, each way a generation can fail ends with
its own message and exit code, and the progress display and the summary show what happened."""

from __future__ import annotations

import io
import json
import os
import re
import threading
import time

import numpy as np
import pytest

from client import BagelClient, cli
from client.cli import ProgressDisplay, build_parser, main, parse_args, timing_summary
from protos import Accepted, GenerateEvent, Progress
from step_cache.registry import POLICIES
from tests.client.fake_prefill import FakePrefillServer

KNOWN_CACHES = ", ".join(name.replace("_", "") for name in POLICIES)


@pytest.fixture
def fake():
    server = FakePrefillServer()
    yield server
    server.stop()


def help_of(parser) -> dict[str, tuple]:
    return {a.dest: (a.help, a.metavar) for a in parser._actions}


def test_the_help_names_the_program_its_commands_and_what_each_flag_does():
    parser = build_parser()
    assert parser.prog == "python -m client"
    assert parser.description == (
        "Generate images, answer questions and chat through a BAGEL prefill service, or check "
        "a service's health."
    )
    [commands] = parser._subparsers._group_actions
    assert {c.dest: c.help for c in commands._choices_actions} == {
        "generate": "text to image; writes a PNG, JPEG or WebP",
        "edit": "image editing: INPUT (PNG or JPEG) changed as PROMPT says; writes a PNG, JPEG "
        "or WebP",
        "understand": "ask about an image (PNG or JPEG); prints the answer as it comes",
        "chat": "send a message; prints the answer as it comes",
        "health": "print the server's health; exit 0 iff SERVING",
    }
    assert help_of(commands.choices["edit"])["input"] == ("the image to edit (PNG or JPEG)", None)
    generate = help_of(commands.choices["generate"])
    assert generate["output"] == (
        "image file to write, its format from the extension: .png, .jpg/.jpeg or .webp (with "
        "--output-format latents: a .npy file of the fp32 latents)",
        None,
    )
    assert generate["size"] == (
        "square image side in pixels, a multiple of the model's size step (default: the model's "
        "native size; edit: the input's size)",
        None,
    )
    assert generate["num_timesteps"][0] == (
        "number of timesteps of the schedule (the sampler takes one step fewer) (default: the "
        "model's, 50 for BAGEL)"
    )
    assert generate["request_id"] == (
        "1 to 128 printable ASCII characters (default: the server assigns one)",
        None,
    )
    assert generate["summary_json"] == (
        "write request_id, seed, steps, cached_steps (0-based) and timings as JSON (default: none)",
        "FILE",
    )
    health = help_of(commands.choices["health"])
    assert health["server"] == (
        "HOST:PORT of the prefill service (default: %(default)s)",
        None,
    )
    assert health["timeout"] == ("deadline of the call in seconds (default: none)", None)


@pytest.mark.parametrize("command", ["generate", "edit", "health"])
def test_help_states_every_flags_default(command: str):
    [commands] = build_parser()._subparsers._group_actions
    parser = commands.choices[command]
    for action in parser._actions:
        if not action.option_strings or action.dest == "help" or action.required:
            continue
        text = action.help or ""
        assert "(default: " in text or "unset:" in text, (action.option_strings, text)


def test_a_command_is_required():
    with pytest.raises(SystemExit) as info:
        parse_args([])
    assert info.value.code == 2


def test_the_summary_path_is_a_path():
    args = parse_args(["generate", "A cat", "-o", "x.png", "--summary-json", "s.json"])
    assert args.summary_json.suffix == ".json"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--size", "64", "--height", "64"], "--size cannot be combined with --width/--height"),
        (["--cache", "lru"], f"unknown cache policy 'lru'; known: {KNOWN_CACHES}"),
        (["--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
    ],
)
def test_a_bad_command_line_says_why(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(["generate", "A cat", "-o", "x.png", *argv])
    assert capsys.readouterr().err.rstrip().endswith(f"error: {message}")


def test_latents_are_written_as_npy_with_their_shape_in_the_report(fake, tmp_path, capsys):
    out, summary = tmp_path / "a" / "b" / "x.npy", tmp_path / "s" / "summary.json"
    fake.servicer.cached_steps = {3}
    code = main(
        ["generate", "A cat", "-o", str(out), "--width", "32", "--height", "48", "--seed", "5"]
        + ["--output-format", "latents", "--summary-json", str(summary), "--server", fake.address]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"wrote {out} (latents 6x64, seed 5, request srv-1)" in captured.out
    array = np.load(out)
    assert array.dtype == np.float32 and array.shape == (6, 64)
    data = json.loads(summary.read_text())
    client_ms = data["timings_ms"].pop("client_ms")
    assert 0 < client_ms < 60_000
    assert data == {
        "request_id": "srv-1",
        "seed": 5,
        "width": 32,
        "height": 48,
        "steps": 3,
        "cached_steps": [2],
        "timings_ms": {"prefill_ms": 12.5, "kv_send_ms": 3.0, "denoise_ms": 100.0},
    }
    assert summary.read_text().endswith("}\n") and '\n  "seed": 5' in summary.read_text()


def test_an_output_that_cannot_be_written_fails_before_the_call_naming_the_flag(
    fake, tmp_path, capsys
):
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = blocker / "x.png"
    assert main(["generate", "A cat", "-o", str(out), "--server", fake.address]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: -o/--output: cannot create {blocker}: File exists"
    )
    assert fake.servicer.requests == []


def test_an_output_in_a_read_only_folder_fails_before_the_call(fake, tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        code = main(["generate", "A cat", "-o", str(folder / "x.png"), "--server", fake.address])
    finally:
        folder.chmod(0o700)
    if os.geteuid() == 0:  # root writes anywhere: the call goes ahead and succeeds
        assert code == 0
        return
    assert code == 2
    assert (
        capsys.readouterr().err.splitlines()[-1] == f"error: -o/--output: {folder} is not writable"
    )
    assert fake.servicer.requests == []


def test_a_summary_that_cannot_be_written_fails_before_the_call_naming_the_flag(
    fake, tmp_path, capsys
):
    blocker = tmp_path / "file"
    blocker.write_text("")
    summary = blocker / "s.json"
    argv = ["generate", "A cat", "-o", str(tmp_path / "x.png"), "--summary-json", str(summary)]
    assert main([*argv, "--server", fake.address]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: --summary-json: cannot create {blocker}: File exists"
    )
    assert fake.servicer.requests == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--width", "-16"], "--width -16: must be a positive number of pixels"),
        (["--size", "-16"], "--size -16: must be a positive number of pixels"),
        (["--steps", "1"], "--steps 1: must be in [2, 1000]"),
        (["--cfg-text", "101"], "--cfg-text 101.0: must be in [0, 100]"),
        (["--cfg-interval", "0.9", "0.1"], "--cfg-interval 0.9 0.1: must satisfy LO <= HI"),
        (["--cfg-interval", "0.5", "2"], "--cfg-interval 0.5 2.0: both ends must be in [0, 1]"),
        (
            ["--seed", "-2"],
            "--seed -2: must be -1 (the server picks) or in 0..9223372036854775807",
        ),
        (["--seed", str(2**63)], f"--seed {2**63}: must be -1 (the server picks) or in 0.."),
        (["--quality", "0"], "--quality 0: must be in 1..100"),
        (["-o", "x.gif"], "-o/--output x.gif: unknown image extension '.gif'; use one of"),
    ],
)
def test_a_bad_flag_is_exit_2_naming_the_flag_before_any_call(fake, capsys, flags, message):
    argv = ["generate", "A cat", "-o", "x.png", *flags, "--server", fake.address]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert (
        capsys.readouterr().err.splitlines()[-1].startswith(f"python -m client: error: {message}")
    )
    assert fake.servicer.requests == []


def test_a_stream_without_an_image_is_exit_1_internal(no_image, tmp_path, capsys):
    argv = ["generate", "A cat", "-o", str(tmp_path / "x.png"), "--request-id", "r-9"]
    assert main([*argv, "--server", no_image.address]) == 1
    assert capsys.readouterr().err.endswith("error: INTERNAL: request r-9 ended without an image\n")


def test_an_interrupt_is_exit_130_cancelled(monkeypatch, tmp_path, capsys):
    def interrupted(self, prompt, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(BagelClient, "generate", interrupted)
    assert main(["generate", "A cat", "-o", str(tmp_path / "x.png")]) == 130
    assert capsys.readouterr().err == "error: CANCELLED: interrupted\n"


def test_the_timeout_flag_is_the_deadline_of_generate_and_of_health(
    fake, tmp_path, capsys, monkeypatch
):
    fake.servicer.steps, fake.servicer.step_delay_s = 100, 0.05
    argv = ["generate", "A cat", "-o", str(tmp_path / "x.png"), "--server", fake.address]
    assert main([*argv, "--timeout", "0.3"]) == 1
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: DEADLINE_EXCEEDED: ")
    seen = []
    original = BagelClient.health

    def health(self, service="", *, timeout=None):
        seen.append(self.timeout)
        return original(self, service, timeout=timeout)

    monkeypatch.setattr(BagelClient, "health", health)
    fake.set_health("SERVING")
    assert main(["health", "--server", fake.address, "--timeout", "3"]) == 0
    assert seen == [3.0]


def test_a_tty_bar_counts_cached_steps_and_keeps_lines_above_it():
    out = io.StringIO()
    display = ProgressDisplay(out, tty=True)
    for step in (1, 2, 3):
        display(GenerateEvent(progress=Progress(step=step, total_steps=4, cached=step > 1)))
    display(GenerateEvent(accepted=Accepted(request_id="r-1", queue_position=2)))
    display.finish()
    text = out.getvalue()
    assert re.search(r"[^-]2 cached", text) and "denoise" in text and "step/s" in text
    assert "accepted request r-1 (queue position 2)\n" in text
    display(GenerateEvent(accepted=Accepted(request_id="r-2")))  # after finish: a plain line
    assert out.getvalue().endswith("accepted request r-2 (running)\n")


def test_a_display_asks_its_output_whether_it_is_a_tty():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert ProgressDisplay(Terminal()).tty is True
    assert ProgressDisplay(io.StringIO()).tty is False


def test_without_a_tty_cached_steps_are_marked_per_line():
    out = io.StringIO()
    display = ProgressDisplay(out, tty=False)
    display(GenerateEvent(progress=Progress(step=1, total_steps=2, cached=False)))
    display(GenerateEvent(progress=Progress(step=2, total_steps=2, cached=True)))
    assert out.getvalue() == "step 1/2\nstep 2/2 (cached)\n"


def test_the_timing_summary_puts_unknown_phases_last_and_the_client_in_ms():
    text = timing_summary({"zeta_ms": 1.0, "prefill_ms": 2.0}, 0.0125)
    assert text.splitlines() == [
        "timings:",
        "  prefill           2.0 ms",
        "  zeta              1.0 ms",
        "  client           12.5 ms",
    ]


@pytest.mark.parametrize(
    "command",
    [["health"], ["generate", "A cat", "-o", "x.png"], ["edit", "in.png", "A cat", "-o", "x.png"]],
)
def test_both_commands_take_the_connection_flags_with_their_help(command):
    [commands] = build_parser()._subparsers._group_actions
    flags = help_of(commands.choices[command[0]])
    assert flags["tls_ca"] == (
        "use TLS, verifying the server with this CA certificate (default: plaintext)",
        "PEM",
    )
    assert flags["tls_cert"] == (
        "use TLS with this client certificate, for mTLS (default: none)",
        "PEM",
    )
    assert flags["tls_key"] == ("private key of --tls-cert (default: none)", "PEM")
    assert flags["auth_token_file"] == (
        "send the bearer token in FILE; health needs none (default: no token)",
        "FILE",
    )
    args = parse_args([*command, "--auth-token-file", "t.txt"])
    assert args.auth_token_file.name == "t.txt"


def test_connect_builds_the_client_from_every_connection_flag(monkeypatch, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    made = []
    monkeypatch.setattr(cli, "BagelClient", lambda *a, **kw: made.append((a, kw)))
    argv = ["health", "--server", "h:1", "--timeout", "2", "--tls-ca", "ca.pem"]
    argv += ["--tls-cert", "c.pem", "--tls-key", "k.pem", "--auth-token-file", str(token)]
    cli.connect(parse_args(argv))
    assert made == [
        (
            ("h:1",),
            {
                "timeout": 2.0,
                "tls_ca": "ca.pem",
                "tls_cert": "c.pem",
                "tls_key": "k.pem",
                "auth_token": "s3cret",
            },
        )
    ]


def test_edit_sends_the_input_file_with_the_prompt_and_every_flag(fake, tmp_path, capsys):
    image, out = tmp_path / "in.png", tmp_path / "out.png"
    image.write_bytes(b"\x89PNG any bytes: the server checks them")
    code = main(
        ["edit", str(image), "make it blue", "-o", str(out), "--steps", "7", "--cfg-img", "1.75"]
        + ["--server", fake.address]
    )
    assert code == 0, capsys.readouterr().err
    [request] = fake.servicer.requests
    assert request.prompt == "make it blue"
    assert list(request.input_images) == [image.read_bytes()]
    assert request.params.num_timesteps == 7 and request.params.cfg_img_scale == 1.75
    assert not request.params.HasField("width")  # unset: the input's size
    assert out.read_bytes().startswith(b"\x89PNG")


def test_an_input_that_cannot_be_read_is_exit_2_naming_the_file(fake, tmp_path, capsys):
    missing = tmp_path / "nope.png"
    code = main(["edit", str(missing), "make it blue", "-o", str(tmp_path / "o.png")])
    assert code == 2
    assert f"cannot read {missing}" in capsys.readouterr().err
    assert fake.servicer.requests == []


def test_health_wait_asks_until_serving(fake, capsys):
    fake.set_health("NOT_SERVING")
    timer = threading.Timer(0.6, fake.set_health, ("SERVING",))
    timer.start()
    started = time.monotonic()
    assert main(["health", "--server", fake.address, "--wait", "20"]) == 0
    assert 0.5 <= time.monotonic() - started < 10
    assert capsys.readouterr().out == "SERVING\n"


def test_health_wait_gives_up_after_its_seconds(fake, capsys):
    fake.set_health("NOT_SERVING")
    started = time.monotonic()
    assert main(["health", "--server", fake.address, "--wait", "0.5"]) == 1
    assert 0.5 <= time.monotonic() - started < 5
    assert capsys.readouterr().out == "NOT_SERVING\n"


def test_health_asks_once_more_when_the_wait_runs_out_after_a_refused_probe(monkeypatch, capsys):
    """The wait ends between a refused probe and the next: the answer printed is a status the
    service gave (asked once more), never nothing."""
    from client.errors import Unavailable

    answers = iter([Unavailable("not listening"), "NOT_SERVING"])

    class Probe:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def health(self):
            answer = next(answers)
            if isinstance(answer, Exception):
                raise answer
            return answer

    clock = iter([0.0, 0.1, 5.0, 5.0, 5.0])  # the deadline, the refusal, then past the wait
    monkeypatch.setattr(cli, "connect", lambda args: Probe())
    monkeypatch.setattr(cli.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(cli.time, "sleep", lambda s: None)
    assert main(["health", "--wait", "1"]) == 1
    assert capsys.readouterr().out == "NOT_SERVING\n"


def test_health_wait_outlasts_a_server_that_is_not_up_yet(capsys):
    assert main(["health", "--server", "127.0.0.1:1", "--wait", "0.5"]) == 1
    assert capsys.readouterr().err.startswith("error: UNAVAILABLE: ")
