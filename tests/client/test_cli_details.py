"""The pieces of `python -m client generate` and of `BagelClient` around the call: the size check
against the model's limits, the plan printed in think mode, the timing lines and the JSON summary,
the re-encoding of the output, the events' result and the stream's status."""

from __future__ import annotations

import io
import json

import grpc
import pytest
from PIL import Image as PILImage

from client import BagelClient
from client.cli import ProgressDisplay, check_size_flags, param_flag, parse_args, timing_summary
from client.cli import write_summary as write_summary_file
from client.errors import DeadlineExceeded
from client.events import GenerationResult, ResultAssembler
from client.output import encode
from protos import Accepted, GenerateEvent, Image, ModelInfo, Progress, TextDelta
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
        assert stream.code() is None
        stream.cancel()
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
