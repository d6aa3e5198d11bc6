"""The pieces of `python -m client generate` and of `BagelClient` around the call: the flags'
bounds and messages, the size check against the model's limits, the plan printed in think mode,
the progress bar, the timing lines and the JSON summary, writing the output after the call,
re-encoding it, the events' result, the stream's status and GetModelInfo's deadline."""

from __future__ import annotations

import io
import json
import threading

import grpc
import pytest
from PIL import Image as PILImage

from client import BagelClient, cli, output
from client.cli import (
    ProgressDisplay,
    check_size_flags,
    main,
    param_flag,
    parse_args,
    timing_summary,
)
from client.cli import write_summary as write_summary_file
from client.errors import DeadlineExceeded
from client.events import GenerationResult, ResultAssembler
from client.output import OutputPathError, check_writable, encode
from client.request import image_bytes
from protos import (
    Accepted,
    GenerateEvent,
    Image,
    ModelInfo,
    ModelInfoRequest,
    Progress,
    TextDelta,
    Usage,
)
from serving.params import MAX_SEED
from tests.client.fake_prefill import FakePrefillServer, png_bytes


@pytest.fixture
def fake():
    server = FakePrefillServer()
    yield server
    server.stop()


def args_of(*flags: str):
    return parse_args(["generate", "A cat", "-o", "x.png", *flags])


def test_size_sets_height_and_width_and_their_errors_name_it():
    args = args_of("--size", "64")
    assert (param_flag("height", args), param_flag("width", args)) == ("--size", "--size")
    plain = args_of("--width", "64")
    assert (param_flag("height", plain), param_flag("width", plain)) == ("--height", "--width")
    info = ModelInfo(model_name="m", size_step=16, max_size=32)
    with pytest.raises(ValueError) as raised:
        check_size_flags(args_of("--width", "16", "--height", "64"), info)
    assert str(raised.value) == "--height 64: must be a multiple of 16 and at most 32 for m"
    with pytest.raises(ValueError) as raised:
        check_size_flags(args_of("--width", "48", "--height", "16"), info)
    assert str(raised.value) == "--width 48: must be a multiple of 16 and at most 32 for m"


def test_the_largest_size_itself_is_allowed_and_a_model_without_limits_checks_none():
    check_size_flags(args_of("--size", "32"), ModelInfo(size_step=16, max_size=32))
    check_size_flags(args_of("--size", "40"), ModelInfo(size_step=0, max_size=32))
    check_size_flags(args_of("--size", "40"), ModelInfo(size_step=16, max_size=0))


def test_a_model_without_a_name_is_this_model():
    with pytest.raises(ValueError) as raised:
        check_size_flags(args_of("--size", "24"), ModelInfo(size_step=16, max_size=32))
    assert str(raised.value) == "--size 24: must be a multiple of 16 and at most 32 for this model"


def thinking(text: str) -> GenerateEvent:
    return GenerateEvent(thinking=TextDelta(text=text))


def progress(step: int) -> GenerateEvent:
    return GenerateEvent(progress=Progress(step=step, total_steps=2))


def test_the_plan_is_printed_after_plan_on_one_line_ended_by_the_first_step():
    out = io.StringIO()
    display = ProgressDisplay(out, tty=False)
    for event in (thinking("a red "), thinking("circle"), progress(1), progress(2)):
        display(event)
    assert out.getvalue() == "plan: a red circle\nstep 1/2\nstep 2/2\n"
    display(thinking("again"))
    assert out.getvalue().endswith("step 2/2\nplan: again")


def test_the_client_line_is_the_wall_time_in_ms():
    assert timing_summary({}, 2.0).splitlines() == ["timings:", "  client         2000.0 ms"]


def test_the_summary_is_written_with_its_folders_and_the_client_time_in_ms(tmp_path):
    result = GenerationResult(
        None, b"", 32, 48, 5, {"prefill_ms": 1.5}, "r-1", steps=3, cached_steps=[1]
    )
    path = tmp_path / "a" / "b" / "summary.json"
    write_summary_file(path, result, 0.25)
    assert json.loads(path.read_text()) == {
        "request_id": "r-1",
        "seed": 5,
        "width": 32,
        "height": 48,
        "steps": 3,
        "cached_steps": [1],
        "timings_ms": {"prefill_ms": 1.5, "client_ms": 250.0},
    }
    assert path.read_text().endswith("}\n")


def test_png_is_kept_as_the_server_sent_it_and_other_formats_are_re_encoded_from_rgb():
    rgba = PILImage.new("RGBA", (4, 2), (10, 20, 30, 128))
    assert encode(b"server png", rgba, "PNG", 90) == b"server png"
    jpeg = encode(b"server png", rgba, "JPEG", 90)
    decoded = PILImage.open(io.BytesIO(jpeg))
    assert decoded.format == "JPEG" and decoded.mode == "RGB" and decoded.size == (4, 2)
    with pytest.raises(ValueError) as raised:
        encode(b"", None, "WEBP", 90)
    assert str(raised.value) == "no decoded image to re-encode"


def test_the_plan_of_a_think_request_is_its_deltas_joined():
    assembler = ResultAssembler()
    assembler.add(thinking("a red "))
    assembler.add(thinking("circle"))
    assembler.add(GenerateEvent(image=Image(png=png_bytes(8, 8), width=8, height=8, seed=1)))
    assert assembler.result({}).thinking == "a red circle"


def test_a_streams_status_is_none_until_the_call_ends(fake):
    fake.servicer.steps, fake.servicer.step_delay_s = 100, 0.05
    with BagelClient(fake.address, timeout=30) as client:
        stream = client.stream("A cat", width=16, height=16)
        assert next(stream).WhichOneof("event") == "accepted"
        asked = []  # in a thread: asking a running call's code must not wait for its end
        thread = threading.Thread(target=lambda: asked.append(stream.code()), daemon=True)
        thread.start()
        thread.join(2.0)
        stream.cancel()
        assert asked == [None]
    fake.servicer.steps, fake.servicer.step_delay_s = 2, 0.0
    with BagelClient(fake.address, timeout=30) as client:
        stream = client.stream("A cat", width=16, height=16)
        assert [e.WhichOneof("event") for e in stream][0] == "accepted"
        assert stream.code() is grpc.StatusCode.OK


def test_edit_passes_on_event_and_the_per_call_timeout(fake):
    seen = []
    with BagelClient(fake.address, timeout=30) as client:
        client.edit(b"\x89PNG", "make it blue", on_event=seen.append, width=16, height=16)
    assert [e.WhichOneof("event") for e in seen] == [
        "accepted",
        "progress",
        "progress",
        "progress",
        "timings",
        "image",
    ]
    fake.servicer.steps, fake.servicer.step_delay_s = 100, 0.05
    with BagelClient(fake.address) as client, pytest.raises(DeadlineExceeded):
        client.edit(b"\x89PNG", "make it blue", timeout=0.4, width=16, height=16)


def test_an_accepted_event_sets_the_request_id():
    assembler = ResultAssembler("mine")
    assembler.add(GenerateEvent(accepted=Accepted(request_id="srv")))
    assembler.add(GenerateEvent(image=Image(png=png_bytes(8, 8), width=8, height=8, seed=1)))
    assert assembler.result({}).request_id == "srv"


def params_of(*flags: str) -> dict:
    return args_of(*flags).params


def test_the_ends_of_the_seed_range_a_one_pixel_side_and_a_point_interval_pass_the_cli():
    assert params_of("--seed", "0")["seed"] == 0
    assert params_of("--seed", str(MAX_SEED))["seed"] == MAX_SEED
    assert params_of("--height", "1")["height"] == 1  # the model's step is checked later
    assert params_of("--cfg-interval", "0.5", "0.5")["cfg_interval"] == (0.5, 0.5)
    assert params_of("--think")["think"] is True
    assert params_of()["think"] is None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--height", "0"], "--height 0: must be a positive number of pixels"),
        (["--width", "0"], "--width 0: must be a positive number of pixels"),
        (["--cfg-text", "inf"], "--cfg-text inf: must be finite"),
        (
            ["-o", "x.gif"],
            "-o/--output x.gif: unknown image extension '.gif'; use one of "
            ".jpeg, .jpg, .png, .webp",
        ),
    ],
)
def test_a_bad_flags_message_is_exactly_the_flag_and_why(capsys, flags, message):
    with pytest.raises(SystemExit):
        args_of(*flags)
    assert capsys.readouterr().err.splitlines()[-1] == f"python -m client: error: {message}"


def test_a_bad_wait_is_exit_2(capsys):
    assert main(["health", "--wait", "-1"]) == 2
    assert capsys.readouterr().err == "error: --wait -1.0: must be at least 0\n"


def test_an_unreadable_input_names_the_file_and_the_reason(fake, tmp_path, capsys):
    missing = tmp_path / "nope.png"
    code = main(["edit", str(missing), "make it blue", "-o", str(tmp_path / "o.png")])
    assert code == 2
    assert capsys.readouterr().err == f"error: cannot read {missing}: No such file or directory\n"


def test_an_unusable_token_file_is_exit_2_with_its_message(fake, tmp_path, capsys):
    token = tmp_path / "token"
    token.write_text("\n")
    argv = ["generate", "A cat", "-o", str(tmp_path / "x.png"), "--auth-token-file", str(token)]
    assert main([*argv, "--server", fake.address]) == 2
    assert capsys.readouterr().err == f"error: the token file {token} is empty\n"


def test_edit_shows_its_progress(fake, tmp_path, capsys):
    image = tmp_path / "in.png"
    image.write_bytes(b"\x89PNG")
    assert (
        main(["edit", str(image), "blue", "-o", str(tmp_path / "o.png"), "--server", fake.address])
        == 0
    )
    assert capsys.readouterr().err.splitlines()[:4] == [
        "accepted request srv-1 (running)",
        "step 1/3",
        "step 2/3",
        "step 3/3",
    ]


def test_a_think_generation_prints_its_plan(fake, tmp_path, capsys):
    out = tmp_path / "x.png"
    argv = ["generate", "A cat", "-o", str(out), "--think", "--seed", "2", "--server", fake.address]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[:2] == [
        "plan: a red circle",
        f"wrote {out} (32x32, seed 2, request srv-1)",
    ]
    assert captured.err.splitlines()[:2] == [
        "accepted request srv-1 (running)",
        "plan: a red circle",
    ]


def test_the_output_folder_is_made_again_if_it_went_away_during_the_call(
    fake, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(cli, "check_writable", lambda path: None)  # as if removed meanwhile
    out = tmp_path / "a" / "b" / "x.png"
    assert main(["generate", "A cat", "-o", str(out), "--server", fake.address]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")


def test_an_output_that_cannot_be_written_after_the_call_is_exit_1(
    fake, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(cli, "check_writable", lambda path: None)
    folder = tmp_path / "x.png"
    folder.mkdir()
    assert main(["generate", "A cat", "-o", str(folder), "--server", fake.address]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: cannot write {folder}: [Errno 21] Is a directory: '{folder}'"
    )


def test_a_summary_that_cannot_be_written_after_the_call_is_exit_1(
    fake, tmp_path, monkeypatch, capsys
):
    def full(path, result, wall_s):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "write_summary", full)
    summary = tmp_path / "s.json"
    argv = ["generate", "A cat", "-o", str(tmp_path / "x.png"), "--summary-json", str(summary)]
    assert main([*argv, "--server", fake.address]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: cannot write {summary}: [Errno 28] No space left on device"
    )


def test_a_tty_bar_is_named_denoise_and_draws_no_frame_for_the_postfix_alone():
    out = io.StringIO()
    display = ProgressDisplay(out, tty=True)
    for step in (1, 2, 3, 4):
        display(GenerateEvent(progress=Progress(step=step, total_steps=4, cached=step > 2)))
    display.finish()
    frames = [f for f in out.getvalue().replace("\n", "\r").split("\r") if f]
    assert frames and all(f.startswith("denoise: ") for f in frames)
    assert not [f for f in frames if " 0/4 " in f and "cached" in f]
    assert "4/4" in frames[-1] and "2 cached" in frames[-1]


class RecordingStub:
    def __init__(self) -> None:
        self.calls = []

    def GetModelInfo(self, request, timeout):
        self.calls.append((request, timeout))
        return ModelInfo(native_size=512)


@pytest.mark.parametrize(
    ("client_timeout", "call_timeout", "deadline"),
    [(None, None, 10.0), (2.5, None, 2.5), (2.5, 0.5, 0.5), (None, 0.5, 0.5)],
)
def test_model_infos_deadline_is_the_calls_the_clients_or_ten_seconds(
    client_timeout, call_timeout, deadline
):
    for ask in ("model_info", "native_size"):
        stub = RecordingStub()
        with BagelClient("127.0.0.1:1", client_timeout) as client:
            client._stub = stub
            got = getattr(client, ask)(timeout=call_timeout)
        assert (got if ask == "native_size" else got.native_size) == 512
        assert stub.calls == [(ModelInfoRequest(), deadline)]


def test_check_writable_names_a_folder_and_asks_about_the_file_if_it_exists(tmp_path, monkeypatch):
    with pytest.raises(OutputPathError) as raised:
        check_writable(tmp_path)
    assert str(raised.value) == f"{tmp_path} is a directory"
    asked = []

    def access(path, mode):  # root may write anything: stand in for a read-only file system
        asked.append(path)
        return False

    monkeypatch.setattr(output.os, "access", access)
    existing = tmp_path / "old.png"
    existing.write_bytes(b"")
    with pytest.raises(OutputPathError) as raised:
        check_writable(existing)
    assert str(raised.value) == f"{existing} is not writable"
    with pytest.raises(OutputPathError) as raised:
        check_writable(tmp_path / "new.png")
    assert str(raised.value) == f"{tmp_path} is not writable"
    assert asked == [existing, tmp_path]


def test_an_input_image_of_another_type_names_the_type():
    with pytest.raises(TypeError) as raised:
        image_bytes(3)
    assert str(raised.value) == (
        "an input image must be bytes, a path or a PIL image, got <class 'int'>"
    )


def test_generate_and_edit_say_what_unset_sizes_become():
    [commands] = cli.build_parser()._subparsers._group_actions
    assert commands.choices["generate"].description == (
        "Unset --size/--width/--height give the model's native size and unset --steps its "
        "default timesteps, as the server's GetModelInfo says."
    )
    assert commands.choices["edit"].description == (
        "Unset --width/--height give the input's resized size; unset CFG flags give BAGEL's "
        "editing settings (--cfg-img 2.0 on (0, 1], text-channel renorm)."
    )


@pytest.mark.parametrize("quality", ["1", "100"])
def test_the_ends_of_the_quality_range_pass(quality):
    assert args_of("--quality", quality).quality == int(quality)


def test_a_quality_above_100_is_refused(capsys):
    with pytest.raises(SystemExit):
        args_of("--quality", "101")
    assert capsys.readouterr().err.splitlines()[-1] == (
        "python -m client: error: --quality 101: must be in 1..100"
    )


def test_health_with_an_unusable_token_file_is_exit_2(tmp_path, capsys):
    token = tmp_path / "token"
    token.write_text("")
    assert main(["health", "--server", "127.0.0.1:1", "--auth-token-file", str(token)]) == 2
    assert capsys.readouterr().err == f"error: the token file {token} is empty\n"


def test_a_result_without_progress_or_usage_counts_zero_and_usage_sets_the_tokens():
    image = GenerateEvent(image=Image(png=png_bytes(8, 8), width=8, height=8, seed=1))
    assembler = ResultAssembler()
    assembler.add(image)
    result = assembler.result({})
    assert (result.request_id, result.steps, result.cached_steps, result.timings) == ("", 0, [], {})
    assert (result.prompt_tokens, result.completion_tokens, result.thinking) == (0, 0, "")
    assembler.add(GenerateEvent(usage=Usage(prompt_tokens=41, completion_tokens=7)))
    assert (assembler.result({}).prompt_tokens, assembler.result({}).completion_tokens) == (41, 7)


def test_the_image_flags_say_what_unset_means_including_the_editing_defaults():
    [commands] = cli.build_parser()._subparsers._group_actions
    flags = {a.dest: a.help for a in commands.choices["generate"]._actions}
    native = "(default: the model's native size; edit: the input's)"
    assert flags["height"] == f"image height in pixels (multiple of 16) {native}"
    assert flags["width"] == f"image width in pixels (multiple of 16) {native}"
    assert flags["quality"] == "JPEG and WebP quality, 1..100 (default: %(default)s)"
    assert flags["cfg_img_scale"] == "image CFG scale (default: 1.5; edit: 2.0)"
    assert flags["cfg_interval"] == (
        "CFG applies for shifted t in (LO, HI] (default: 0.4 1.0; edit: 0.0 1.0)"
    )
    assert flags["cfg_renorm_type"] == "CFG renorm (default: global; edit: text_channel)"
    assert flags["negative_prompt"] == (
        "negative prompt: the unconditional text context (default: none)"
    )
    assert flags["seed"] == (
        "noise seed (unset or -1 through the client: the server picks one) (default: 0)"
    )
    assert flags["cache"].startswith("step-cache policy (unset: the diffusion service's default)")
    assert "(default: " not in flags["cache"]
    assert flags["think"] == (
        "the model first writes a plan (printed), then draws from it (default: off)"
    )


def test_health_wait_is_seconds_defaulting_to_asking_once():
    [commands] = cli.build_parser()._subparsers._group_actions
    [wait] = [a for a in commands.choices["health"]._actions if a.dest == "wait"]
    assert (wait.metavar, wait.default, wait.type) == ("SECONDS", 0.0, float)
    assert wait.help == (
        "ask again until SERVING or SECONDS have passed, e.g. while the services start "
        "(default: %(default)s, ask once)"
    )
    assert parse_args(["health"]).wait == 0.0
