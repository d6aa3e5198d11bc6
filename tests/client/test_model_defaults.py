"""The client's defaults come from the server's GetModelInfo, its output format from the file
extension, and `--seed -1` leaves the seed to the server, which the CLI prints."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from client import BagelClient
from client.cli import main
from protos import ModelInfo
from tests.client.fake_prefill import FakePrefillServer, png_bytes

TINY_SHAPES = ModelInfo(
    model_name="tiny-shapes",
    native_size=128,
    max_size=1024,
    size_step=16,
    default_num_timesteps=50,
)


@pytest.fixture
def fake():
    server = FakePrefillServer()
    server.servicer.model_info = TINY_SHAPES
    yield server
    server.stop()


def test_an_unsized_request_gets_the_models_native_size(fake):
    with BagelClient(fake.address) as client:
        result = client.generate("a red circle")
        assert client.model_info() == TINY_SHAPES
    [request] = fake.servicer.requests
    assert (request.params.width, request.params.height) == (128, 128)
    assert (result.width, result.height) == (128, 128)
    assert fake.servicer.model_info_calls == 1  # asked once per client


def test_a_sized_request_is_sent_as_asked_without_asking_the_model(fake):
    with BagelClient(fake.address) as client:
        client.generate("a red circle", width=64, height=32)
    [request] = fake.servicer.requests
    assert (request.params.width, request.params.height) == (64, 32)
    assert fake.servicer.model_info_calls == 0


def test_a_server_without_get_model_info_leaves_the_size_to_the_server(fake):
    fake.servicer.model_info = None
    with BagelClient(fake.address) as client:
        client.generate("a red circle")
    [request] = fake.servicer.requests
    assert not request.params.HasField("width") and not request.params.HasField("height")


def test_an_edit_keeps_the_inputs_size(fake):
    png = io.BytesIO()
    Image.new("RGB", (48, 48)).save(png, format="PNG")
    with BagelClient(fake.address) as client:
        client.edit(png.getvalue(), "make it blue")
    [request] = fake.servicer.requests
    assert not request.params.HasField("width")
    assert fake.servicer.model_info_calls == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--size", "100"],
            "--size 100: must be a multiple of 16 and at most 1024 for tiny-shapes",
        ),
        (["--width", "2048"], "--width 2048: must be a multiple of 16 and at most 1024"),
    ],
)
def test_a_size_the_model_cannot_draw_names_the_flag_before_generating(
    fake, tmp_path, capsys, flags, message
):
    argv = ["generate", "x", "-o", str(tmp_path / "x.png"), *flags, "--server", fake.address]
    assert main(argv) == 2
    assert (
        capsys.readouterr().err.splitlines()[-1].startswith(f"error: INVALID_ARGUMENT: {message}")
    )
    assert fake.servicer.requests == []


@pytest.mark.parametrize(
    ("name", "fmt"), [("a.jpg", "JPEG"), ("a.JPEG", "JPEG"), ("a.webp", "WEBP")]
)
def test_the_output_format_follows_the_extension(fake, tmp_path, name, fmt):
    out = tmp_path / name
    assert main(["generate", "x", "-o", str(out), "--size", "32", "--server", fake.address]) == 0
    with Image.open(out) as image:
        assert image.format == fmt and image.size == (32, 32)
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    # The fake draws (10, 20, 30) everywhere; a lossy format stays close to it.
    assert np.abs(pixels - [10, 20, 30]).max() <= 3


def test_png_is_written_as_the_server_sent_it(fake, tmp_path):
    out = tmp_path / "a.png"
    assert main(["generate", "x", "-o", str(out), "--size", "32", "--server", fake.address]) == 0
    assert out.read_bytes() == png_bytes(32, 32)


def test_quality_changes_the_jpeg(fake, tmp_path):
    sizes = []
    for quality in ("5", "95"):
        out = tmp_path / f"q{quality}.jpg"
        argv = ["generate", "x", "-o", str(out), "--size", "64", "--quality", quality]
        assert main([*argv, "--server", fake.address]) == 0
        sizes.append(out.stat().st_size)
    assert sizes[0] < sizes[1]


def test_seed_minus_one_lets_the_server_pick_and_prints_the_seed(fake, tmp_path, capsys):
    out = tmp_path / "a.png"
    argv = ["generate", "x", "-o", str(out), "--size", "32", "--seed", "-1"]
    assert main([*argv, "--server", fake.address]) == 0
    [request] = fake.servicer.requests
    assert not request.params.HasField("seed")
    assert "seed 1234 picked by the server" in capsys.readouterr().out  # the fake's pick


def test_seed_minus_one_through_the_python_client_is_unset(fake):
    with BagelClient(fake.address) as client:
        result = client.generate("x", width=32, height=32, seed=-1)
    assert not fake.servicer.requests[0].params.HasField("seed") and result.seed == 1234


@pytest.mark.parametrize("side", ["width", "height"])
def test_a_request_that_sets_one_side_is_sent_as_asked_without_asking_the_model(fake, side):
    with BagelClient(fake.address) as client:
        client.generate("a red circle", **{side: 48})
    [request] = fake.servicer.requests
    assert getattr(request.params, side) == 48
    other = "height" if side == "width" else "width"
    assert not request.params.HasField(other) and fake.servicer.model_info_calls == 0


def test_the_calls_timeout_is_the_deadline_of_asking_the_native_size(fake):
    deadlines = []
    with BagelClient(fake.address, timeout=30) as client:
        real = client._stub.GetModelInfo

        def get_model_info(request, timeout):
            deadlines.append(timeout)
            return real(request, timeout=timeout)

        client._stub.GetModelInfo = get_model_info
        client.generate("a red circle", timeout=7.5)
    assert deadlines == [7.5]
