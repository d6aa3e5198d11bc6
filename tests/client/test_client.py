"""`BagelClient` and the `python -m client` CLI against a fake Prefill server on 127.0.0.1."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from client import BagelClient, IncompleteGeneration
from client import client as client_module
from client.cli import ProgressDisplay, generation_params, main, parse_args, timing_summary
from protos import GenerateEvent, Progress
from protos.options import channel_options
from serving.params import GenerationParams
from serving.text_params import sampling_names
from tests.client.fake_prefill import FakePrefillServer
from tests.helpers.processes import ROOT
from tests.helpers.ranks import free_port
from tests.serving.examples import EVERY_FIELD, EVERY_FIELD_FLAGS, fields_left_at_default


@pytest.fixture
def fake():
    server = FakePrefillServer()
    yield server
    server.stop()


def test_generate_returns_image_seed_timings_and_request_id(fake):
    with BagelClient(fake.address, timeout=10) as client:
        result = client.generate("A cute cat", width=48, height=32, seed=7, request_id="abc")
    assert (result.width, result.height, result.seed, result.request_id) == (48, 32, 7, "abc")
    assert result.image.size == (48, 32) and result.png.startswith(b"\x89PNG")
    assert result.timings == {"prefill_ms": 12.5, "kv_send_ms": 3.0, "denoise_ms": 100.0}
    [request] = fake.servicer.requests
    assert request.prompt == "A cute cat" and request.params.seed == 7


def test_generate_raises_the_server_status(fake):
    fake.servicer.fail_with = (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full")
    with BagelClient(fake.address) as client, pytest.raises(grpc.RpcError) as info:
        client.generate("A cute cat")
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details() == "queue is full"


def test_generate_rejects_unknown_keywords_before_calling(fake):
    with BagelClient(fake.address) as client, pytest.raises(TypeError):
        client.generate("A cute cat", guidance=3)
    assert fake.servicer.requests == []


def test_stream_can_be_cancelled_and_the_server_sees_it(fake):
    fake.servicer.steps, fake.servicer.step_delay_s = 100, 0.05
    with BagelClient(fake.address, timeout=30) as client:
        events = client.stream("A cute cat")
        kinds = []
        with pytest.raises(grpc.RpcError) as info:
            for event in events:
                kinds.append(event.WhichOneof("event"))
                if kinds.count("progress") == 2:
                    events.cancel()
    assert info.value.code() is grpc.StatusCode.CANCELLED
    assert kinds == ["accepted", "progress", "progress"]
    assert fake.servicer.cancelled.wait(5)


def test_stream_deadline_gives_deadline_exceeded(fake):
    fake.servicer.steps, fake.servicer.step_delay_s = 100, 0.05
    with BagelClient(fake.address, timeout=0.5) as client, pytest.raises(grpc.RpcError) as info:
        list(client.stream("A cute cat"))
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


def test_health_names_the_status(fake):
    with BagelClient(fake.address) as client:
        fake.set_health("SERVING")
        assert client.health() == "SERVING"
        fake.set_health("NOT_SERVING")
        assert client.health() == "NOT_SERVING"


# ---- the command line -------------------------------------------------------------------------


def test_cli_parses_size_and_maps_flags_to_params():
    args = parse_args(
        ["generate", "A cat", "-o", "x.png", "--size", "512", "--steps", "20", "--seed", "52"]
        + ["--cfg-text", "4.0", "--cfg-img", "1.5", "--negative", "blurry"]
        + ["--cfg-interval", "0.4", "1.0", "--cfg-renorm-type", "channel"]
    )
    assert (
        args.server == "127.0.0.1:50051" and args.timeout is None and args.output == Path("x.png")
    )
    params = generation_params(args)
    assert params["width"] == params["height"] == 512
    assert params["num_timesteps"] == 20 and params["seed"] == 52
    assert params["cfg_text_scale"] == 4.0 and params["cfg_img_scale"] == 1.5
    assert params["negative_prompt"] == "blurry" and params["cfg_interval"] == (0.4, 1.0)
    assert params["cfg_renorm_type"] == "channel" and params["timestep_shift"] is None


def test_cli_sends_every_field_and_the_request_id_unchanged(fake, tmp_path, capsys):
    assert fields_left_at_default(EVERY_FIELD) == []
    argv = ["generate", "A cat", "-o", str(tmp_path / "x.png"), *EVERY_FIELD_FLAGS]
    assert main([*argv, "--server", fake.address, "--timeout", "10"]) == 0, capsys.readouterr()
    [request] = fake.servicer.requests
    assert request.prompt == "A cat" and request.request_id == "every-field-1"
    assert GenerationParams.from_proto(request.params) == EVERY_FIELD


def test_cli_leaves_every_field_unset_unless_given():
    params = generation_params(parse_args(["generate", "A cat", "-o", "x.png"]))
    assert params == dict.fromkeys(params) and "request_id" in params
    think = {"think", *sampling_names("think_")}
    assert (
        set(params) == {f for f in GenerationParams.__dataclass_fields__} | {"request_id"} | think
    )


def test_cli_width_and_height_separately_and_unset_by_default():
    params = generation_params(parse_args(["generate", "A cat", "-o", "x.png", "--width", "256"]))
    assert params["width"] == 256 and params["height"] is None and params["seed"] is None


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "A cat", "-o", "x.png", "--size", "512", "--width", "256"],
        ["generate", "A cat"],  # no output
        ["generate", "A cat", "-o", "x.png", "--steps", "many"],
        ["paint", "A cat"],
    ],
)
def test_cli_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2


def test_cli_generate_prints_one_line_per_step_and_a_timing_summary(fake, tmp_path, capsys):
    out = tmp_path / "sub" / "cat.png"
    code = main(
        ["generate", "A cute cat", "-o", str(out), "--width", "48", "--height", "32"]
        + ["--seed", "52", "--steps", "3", "--server", fake.address, "--timeout", "10"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.err.splitlines()
    assert lines == ["accepted request srv-1 (running)", "step 1/3", "step 2/3", "step 3/3"]
    assert out.read_bytes().startswith(b"\x89PNG")
    assert f"wrote {out} (48x32, seed 52, request srv-1)" in captured.out
    assert "prefill" in captured.out and "12.5 ms" in captured.out and "client" in captured.out
    params = fake.servicer.requests[0].params
    assert (params.width, params.height, params.num_timesteps, params.seed) == (48, 32, 3, 52)


def test_cli_generate_error_prints_status_and_exits_nonzero(fake, tmp_path, capsys):
    fake.servicer.fail_with = (grpc.StatusCode.INVALID_ARGUMENT, "height=100 must be a multiple")
    code = main(["generate", "A cat", "-o", str(tmp_path / "x.png"), "--server", fake.address])
    err = capsys.readouterr().err
    assert code == 1
    assert err.strip().endswith("error: INVALID_ARGUMENT: height=100 must be a multiple")
    assert not (tmp_path / "x.png").exists()


def test_cli_health_exit_code_is_zero_only_when_serving(fake, capsys):
    fake.set_health("SERVING")
    assert main(["health", "--server", fake.address]) == 0
    fake.set_health("NOT_SERVING")
    assert main(["health", "--server", fake.address]) == 1
    assert capsys.readouterr().out.split() == ["SERVING", "NOT_SERVING"]
    assert main(["health", "--server", f"127.0.0.1:{free_port()}", "--timeout", "2"]) == 1
    assert capsys.readouterr().err.startswith("error: UNAVAILABLE: ")


def test_cli_process_progress_is_line_per_step_when_not_a_tty(fake, tmp_path):
    out = tmp_path / "cat.png"
    proc = subprocess.run(
        [sys.executable, "-m", "client", "generate", "A cute cat", "-o", str(out)]
        + ["--server", fake.address, "--size", "32"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("step")] == [
        "step 1/3",
        "step 2/3",
        "step 3/3",
    ]
    assert out.exists()


def test_tty_progress_is_a_bar_that_ends_at_the_total():
    out = io.StringIO()
    display = ProgressDisplay(out, tty=True)
    for step in (1, 2, 3):
        display(GenerateEvent(progress=Progress(step=step, total_steps=3, cached=step == 2)))
    display.finish()
    text = out.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1 and "\r" in text
    assert "3/3" in text and "1 cached" in text


def test_timing_summary_lists_phases_in_protocol_order():
    text = timing_summary({"decode_ms": 3.0, "prefill_ms": 10.0, "receive_ms": 2.0}, 1.5)
    names = [line.split()[0] for line in text.splitlines()[1:]]
    assert names == ["prefill", "receive", "decode", "client"]


def test_cli_summary_json_lists_the_cached_steps_zero_based(fake, tmp_path, capsys):
    fake.servicer.cached_steps = {2, 3}
    summary = tmp_path / "out" / "summary.json"
    code = main(
        ["generate", "A cat", "-o", str(tmp_path / "cat.png"), "--seed", "9", "--steps", "4"]
        + ["--request-id", "r-7", "--summary-json", str(summary), "--server", fake.address]
    )
    fake.servicer.cached_steps = set()
    assert code == 0, capsys.readouterr().err
    data = json.loads(summary.read_text())
    assert data["request_id"] == "r-7" and data["seed"] == 9
    assert data["steps"] == 3 and data["cached_steps"] == [1, 2]
    assert data["timings_ms"]["prefill_ms"] == 12.5 and data["timings_ms"]["client_ms"] > 0


def test_cli_bad_cache_spec_fails_before_any_call(fake, tmp_path, capsys):
    before = len(fake.servicer.requests)
    with pytest.raises(SystemExit) as info:
        main(["generate", "A cat", "-o", str(tmp_path / "x.png"), "--cache", "dbcache:fx=1"])
    assert info.value.code == 2
    assert "unknown option 'fx'" in capsys.readouterr().err
    assert len(fake.servicer.requests) == before


def test_cli_latents_output_writes_the_fp32_array(fake, tmp_path, capsys):
    out = tmp_path / "latents.npy"
    code = main(
        ["generate", "A cat", "-o", str(out), "--size", "32", "--output-format", "latents"]
        + ["--server", fake.address]
    )
    assert code == 0, capsys.readouterr().err
    array = np.load(out)
    assert array.dtype == np.float32 and array.shape == (4, 64)
    assert np.array_equal(array.ravel(), np.arange(256, dtype=np.float32))


def test_generate_reports_every_event_the_step_count_and_cached_steps_zero_based(fake):
    fake.servicer.steps, fake.servicer.cached_steps = 4, {2, 4}
    kinds = []
    with BagelClient(fake.address, timeout=10) as client:
        assert client.address == fake.address
        result = client.generate(
            "A cat", on_event=lambda event: kinds.append(event.WhichOneof("event"))
        )
    assert kinds == ["accepted", *["progress"] * 4, "timings", "image"]
    assert (result.steps, result.cached_steps, result.request_id) == (4, [1, 3], "srv-1")


def test_latents_without_a_requested_size_report_zero_sides(fake):
    with BagelClient(fake.address, timeout=10) as client:
        result = client.generate("A cat", output_format="latents", seed=3)
    assert (result.width, result.height, result.seed) == (0, 0, 3)
    assert result.image is None and result.png == b""
    assert result.latents.dtype == np.float32 and result.latents.shape == (4, 64)
    assert np.array_equal(result.latents.ravel(), np.arange(256, dtype=np.float32))


def test_a_per_call_timeout_overrides_the_clients_default(fake):
    fake.servicer.steps, fake.servicer.step_delay_s = 100, 0.05
    with BagelClient(fake.address, timeout=60) as client:
        with pytest.raises(grpc.RpcError) as info:
            list(client.stream("A cat", timeout=0.3))
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(grpc.RpcError) as info:
            client.generate("A cat", timeout=0.3)
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_stream_that_ends_without_an_image_names_the_request_it_was(no_image):
    with BagelClient(no_image.address, timeout=10) as client:
        with pytest.raises(IncompleteGeneration, match="^request r-5 ended without an image$"):
            client.generate("A cat", request_id="r-5")
        with pytest.raises(IncompleteGeneration, match=r"^request \? ended without an image$"):
            client.generate("A cat")
        latents = client.generate("A cat", output_format="latents", request_id="r-6")
    assert latents.request_id == "r-6"


class RecordingHealthStub:
    """Stands in for the health stub: records each Check's service and deadline."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float | None]] = []

    def Check(self, request, timeout=None):
        self.calls.append((request.service, timeout))
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def test_health_asks_for_the_service_within_the_call_client_or_default_deadline(fake):
    for client_timeout, call_timeout, deadline in (
        (None, None, 10.0),
        (3.0, None, 3.0),
        (3.0, 0.5, 0.5),
    ):
        with BagelClient(fake.address, timeout=client_timeout) as client:
            client._health = stub = RecordingHealthStub()
            assert client.health("bagel.v1.Prefill", timeout=call_timeout) == "SERVING"
        assert stub.calls == [("bagel.v1.Prefill", deadline)]


def test_a_stream_has_no_code_until_it_ends_then_its_status(fake):
    fake.servicer.steps, fake.servicer.step_delay_s = 100, 0.05
    with BagelClient(fake.address, timeout=30) as client:
        events = client.stream("A cat")
        next(events)
        assert events.code() is None
        events.cancel()
        assert events.code() is grpc.StatusCode.CANCELLED
        fake.servicer.steps, fake.servicer.step_delay_s = 2, 0.0
        with client.stream("A cat") as done:
            list(done)
            assert done.code() is grpc.StatusCode.OK


def test_the_client_opens_the_channel_its_arguments_ask_for(monkeypatch):
    opened = []

    def open_channel(*args, **kwargs):
        opened.append((args, kwargs))
        return grpc.insecure_channel("127.0.0.1:1")

    monkeypatch.setattr(client_module, "open_channel", open_channel)
    tls = {"tls_ca": "ca.pem", "tls_cert": "c.pem", "tls_key": "k.pem"}
    with BagelClient("h:1", 2.5, auth_token="tok", **tls) as client:
        assert (client.address, client.timeout) == ("h:1", 2.5)
    assert opened == [(("h:1", channel_options()), {**tls, "auth_token": "tok"})]
