"""Image editing in the prefill service, over real gRPC against the fake diffusion service: the
three contexts that arrive equal the in-process edit contexts bit for bit, the output size and
CFG settings default to the edit's, and a bad image is INVALID_ARGUMENT before any compute."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from bagel.network.kv import Branch
from bagel.pipeline import Pipeline
from bagel.prompting.contexts import EditResize
from bagel.prompting.image_transforms import ResizeRule
from client import BagelClient
from prefill_service.prefill import LanguageModelKV
from prefill_service.settings import PrefillSettings
from serving.imaging.input_images import MAX_INPUT_IMAGE_BYTES, MAX_INPUT_IMAGE_PIXELS
from serving.params import GenerationParams
from tests.prefill_service.conftest import InstrumentedSource, RunningPrefill
from tests.prefill_service.fake_diffusion import FakeDiffusion

RULES = EditResize(ResizeRule(128, 64, 16), ResizeRule(112, 56, 14))


def png(width: int = 90, height: int = 60, seed: int = 0, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width x height` pixels, with one tiny data chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00"))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def edit_source(tiny_model_dir: Path) -> InstrumentedSource:
    return InstrumentedSource(LanguageModelKV(tiny_model_dir, "cpu", edit_resize=RULES))


@pytest.fixture(scope="module")
def edit_prefill(
    loop_thread, tiny_model_dir: Path, fake_diffusion_server: FakeDiffusion, edit_source
) -> Iterator[RunningPrefill]:
    settings = PrefillSettings(
        model_dir=str(tiny_model_dir),
        listen="127.0.0.1:0",
        diffusion=fake_diffusion_server.address,
        chunk_size=4096,
    )
    running = RunningPrefill(loop_thread, settings, edit_source)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir: Path) -> Pipeline:
    return Pipeline(tiny_model_dir, "cpu")


def test_the_three_edit_contexts_arrive_equal_to_the_in_process_ones(
    edit_prefill, edit_source, fake_diffusion, pipeline
):
    edit_source.reset()
    image = png(90, 60)
    with BagelClient(edit_prefill.address, timeout=60) as client:
        client.edit(image, "make the sky purple", seed=3, negative_prompt="blurry")
    [call] = fake_diffusion.calls
    received = call.received
    expected = pipeline.edit_contexts(
        pipeline.edit_image(Image.open(io.BytesIO(image)), RULES), "make the sky purple", "blurry"
    )
    assert [c.kind for c in received.cache.contexts] == [
        Branch.COND,
        Branch.UNCOND_TEXT,
        Branch.UNCOND_IMG,
    ]
    for got in received.cache.contexts:
        want = expected[Branch(got.kind)]
        assert got.num_tokens == want.num_tokens
        assert got.next_rope_position == want.next_rope_position
        for layer in range(len(want.keys)):
            assert torch.equal(got.keys[layer], want.keys[layer])
            assert torch.equal(got.values[layer], want.values[layer])
    # the three differ: image + prompt, image + negative prompt, prompt alone
    sizes = {Branch(c.kind): c.num_tokens for c in received.cache.contexts}
    assert len(set(sizes.values())) == 3
    assert sizes[Branch.COND] > sizes[Branch.UNCOND_TEXT] > sizes[Branch.UNCOND_IMG]


def test_without_a_negative_prompt_uncond_text_travels_as_the_start_of_cond(
    edit_prefill, fake_diffusion, pipeline
):
    image = png(90, 60, seed=4)
    with BagelClient(edit_prefill.address, timeout=60) as client:
        client.edit(image, "make it red", seed=2)
    [call] = fake_diffusion.calls
    cond, text, img = call.header.contexts
    assert text.HasField("prefix_of") and text.prefix_of == 0
    assert not cond.HasField("prefix_of") and not img.HasField("prefix_of")
    llm = pipeline.config.llm
    per_token = 2 * llm.num_layers * llm.num_kv_heads * llm.head_dim * 4  # K and V in fp32
    assert call.header.total_bytes == (cond.num_tokens + img.num_tokens) * per_token
    expected = pipeline.edit_contexts(
        pipeline.edit_image(Image.open(io.BytesIO(image)), RULES), "make it red"
    )
    for got in call.received.cache.contexts:
        want = expected[Branch(got.kind)]
        assert got.num_tokens == want.num_tokens
        for layer in range(len(want.keys)):
            assert torch.equal(got.keys[layer], want.keys[layer])
            assert torch.equal(got.values[layer], want.values[layer])


def test_an_edit_defaults_to_the_inputs_resized_size_and_the_editing_cfg(
    edit_prefill, fake_diffusion
):
    with BagelClient(edit_prefill.address, timeout=60) as client:
        client.edit(png(90, 60), "make it red", seed=1)
        client.edit(png(90, 60), "make it red", seed=1, width=32, height=48, cfg_img_scale=1.25)
    default, explicit = (
        GenerationParams.from_proto(call.received.params) for call in fake_diffusion.calls
    )
    # 90x60 -> shortest side up to 64, stride 16: 96x64
    assert (default.width, default.height) == (96, 64)
    assert default.cfg_img_scale == 2.0 and default.cfg_interval == (0.0, 1.0)
    assert default.cfg_renorm_type == "text_channel"
    assert (explicit.width, explicit.height) == (32, 48)
    assert explicit.cfg_img_scale == 1.25 and explicit.cfg_interval == (0.0, 1.0)


def test_text_to_image_keeps_its_two_contexts_and_defaults(edit_prefill, fake_diffusion):
    with BagelClient(edit_prefill.address, timeout=60) as client:
        client.generate("a red circle", seed=1, width=32, height=32)
    [call] = fake_diffusion.calls
    assert [c.kind for c in call.received.cache.contexts] == [Branch.COND, Branch.UNCOND_TEXT]
    params = GenerationParams.from_proto(call.received.params)
    assert params.cfg_img_scale == 1.5 and params.cfg_interval == (0.4, 1.0)


def _jpeg_cut_short() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()[:200]


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="GIF")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("images", "needle"),
    [
        ([b""], "input_images[0] is empty"),
        ([b"hello, not an image"], "input_images[0] is not a PNG or JPEG image"),
        ([_gif()], "input_images[0] is not a PNG or JPEG image"),
        ([_jpeg_cut_short()], "input_images[0] is not a decodable PNG or JPEG image"),
        ([png(64, 64)[:-200]], "input_images[0] does not decode (PNG)"),
        ([png_header_only(0, 10)], "input_images[0]"),
        ([png_header_only(10_000, 10_000)], f"the limit is {MAX_INPUT_IMAGE_PIXELS} pixels"),
        ([b"\x89PNG" + bytes(MAX_INPUT_IMAGE_BYTES)], f"the limit is {MAX_INPUT_IMAGE_BYTES}"),
        ([png(), png()], "2 input images were sent; at most 1"),
    ],
    ids=[
        "empty",
        "garbage",
        "gif",
        "cut-header",
        "cut-data",
        "zero-width",
        "too-many-pixels",
        "too-big",
        "two",
    ],
)
def test_a_bad_image_is_invalid_argument_before_any_compute_and_the_service_keeps_serving(
    edit_prefill, edit_source, fake_diffusion, images, needle
):
    edit_source.reset()
    with BagelClient(edit_prefill.address, timeout=60) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.generate("make it blue", input_images=images, width=32, height=32)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert needle in info.value.details()
        assert fake_diffusion.calls == []
        assert edit_source.layer_done_times == []
        client.edit(png(), "make it blue", width=32, height=32)  # still serving
    assert len(fake_diffusion.calls) == 1


def test_grey_and_transparent_images_are_converted_to_rgb(edit_prefill, fake_diffusion):
    with BagelClient(edit_prefill.address, timeout=60) as client:
        client.edit(png(mode="L"), "colour it", width=32, height=32)
        client.edit(png(mode="RGBA"), "colour it", width=32, height=32)
    assert len(fake_diffusion.calls) == 2


def test_a_text_only_prefill_refuses_images_instead_of_ignoring_them(
    loop_thread, tiny_model_dir, fake_diffusion
):
    source = LanguageModelKV(tiny_model_dir, "cpu", image_input=False)
    settings = PrefillSettings(
        model_dir=str(tiny_model_dir), listen="127.0.0.1:0", diffusion=fake_diffusion.address
    )
    running = RunningPrefill(loop_thread, settings, source)
    try:
        with (
            BagelClient(running.address, timeout=60) as client,
            pytest.raises(grpc.RpcError) as info,
        ):
            client.edit(png(), "make it blue")
    finally:
        running.stop()
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "takes no input images" in info.value.details()
    assert fake_diffusion.calls == []
