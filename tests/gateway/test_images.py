"""The Images API through the gateway, driven by the official `openai` SDK, against the gRPC
client's images from the same services: generations, n seeds, an edit, streamed previews, JPEG and
WebP, the model list, and every error the contract names."""

from __future__ import annotations

import http.client
import io
import json
import time

import numpy as np
import openai
import pytest
from PIL import Image

from client import BagelClient
from gateway.errors import from_grpc
from tests.gateway.conftest import (
    MAX_QUEUE,
    PROMPT,
    SIZE,
    STEPS,
    GatewayProcess,
    decoded,
    http_get,
    pixels,
    wait_for,
)
from tests.helpers.ranks import free_port

SMALL = {"num_timesteps": STEPS}


def grpc_image(prefill, prompt: str = PROMPT, **params) -> bytes:
    with BagelClient(prefill.address, timeout=120) as client:
        return client.generate(prompt, height=128, width=128, **params).png


def open_post(
    gateway: GatewayProcess, path: str, body: dict, timeout: float = 60
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """POST `body` as JSON and read the answer's status line and headers (not its body); the
    caller closes the connection. A timeout closes it and raises TimeoutError."""
    host, port = gateway.address.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request(
            "POST", path, json.dumps(body), headers={"Content-Type": "application/json"}
        )
        return connection, connection.getresponse()
    except BaseException:
        connection.close()
        raise


def png_bytes(b64_json: str) -> bytes:
    import base64

    return base64.b64decode(b64_json)


def test_a_generation_equals_the_grpc_clients_image_for_the_same_seed(sdk, prefill):
    reply = sdk.images.generate(
        prompt=PROMPT, size=SIZE, extra_body={"seed": 21, "cfg_text_scale": 3.0, **SMALL}
    )
    [image] = reply.data
    assert reply.size == SIZE and reply.output_format == "png"
    assert image.model_extra["bagel"]["seed"] == 21
    assert image.model_extra["bagel"]["steps"] == STEPS - 1
    assert image.model_extra["bagel"]["timings_ms"]["denoise_ms"] > 0
    served = png_bytes(image.b64_json)
    reference = grpc_image(prefill, seed=21, cfg_text_scale=3.0, **SMALL)
    assert decoded(image.b64_json).size == (128, 128)
    assert np.array_equal(
        pixels(decoded(image.b64_json)), pixels(Image.open(io.BytesIO(reference)))
    )
    assert served == reference


def test_n_2_draws_seed_and_seed_plus_1(sdk, prefill):
    reply = sdk.images.generate(prompt=PROMPT, size=SIZE, n=2, extra_body={"seed": 40, **SMALL})
    seeds = [d.model_extra["bagel"]["seed"] for d in reply.data]
    assert seeds == [40, 41]
    first, second = (png_bytes(d.b64_json) for d in reply.data)
    assert first != second
    assert second == grpc_image(prefill, seed=41, **SMALL)


def test_an_unset_seed_is_chosen_and_reported_so_the_image_can_be_redrawn(sdk):
    reply = sdk.images.generate(prompt=PROMPT, size=SIZE, n=2, extra_body=SMALL)
    first, second = (d.model_extra["bagel"]["seed"] for d in reply.data)
    assert second == first + 1
    again = sdk.images.generate(prompt=PROMPT, size=SIZE, extra_body={"seed": first, **SMALL})
    assert again.data[0].b64_json == reply.data[0].b64_json


def test_an_edit_equals_the_grpc_clients_edit(sdk, prefill):
    source = grpc_image(prefill, seed=3, **SMALL)
    reply = sdk.images.edit(
        image=("circle.png", source, "image/png"),
        prompt="make the circle blue",
        size=SIZE,
        extra_body={"seed": 9, "cfg_interval": [0.0, 1.0], **SMALL},
    )
    [image] = reply.data
    with BagelClient(prefill.address, timeout=120) as client:
        reference = client.edit(
            source,
            "make the circle blue",
            height=128,
            width=128,
            seed=9,
            cfg_interval=(0.0, 1.0),
            **SMALL,
        ).png
    assert png_bytes(image.b64_json) == reference
    assert image.model_extra["bagel"]["seed"] == 9


@pytest.mark.parametrize("previews", [0, 2, 3])
def test_a_stream_sends_exactly_partial_images_previews_then_the_completed_image(
    sdk, prefill, previews
):
    stream = sdk.images.generate(
        prompt=PROMPT,
        size=SIZE,
        stream=True,
        partial_images=previews,
        extra_body={"seed": 5, "num_timesteps": 8},
    )
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * previews + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:-1]] == list(range(previews))
    for preview in events[:-1]:
        assert decoded(preview.b64_json).format == "PNG"
    completed = events[-1]
    assert completed.size == SIZE
    assert png_bytes(completed.b64_json) == grpc_image(prefill, seed=5, num_timesteps=8)


def test_an_edit_streams_image_edit_events(sdk, prefill):
    source = grpc_image(prefill, seed=3, **SMALL)
    events = list(
        sdk.images.edit(
            image=("circle.png", source, "image/png"),
            prompt="make the circle blue",
            size=SIZE,
            stream=True,
            partial_images=1,
            extra_body={"seed": 9, **SMALL},
        )
    )
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_jpeg_and_webp_outputs_decode_to_the_png_within_compression_error(sdk, prefill, fmt):
    reply = sdk.images.generate(
        prompt=PROMPT,
        size=SIZE,
        output_format=fmt,
        output_compression=90,
        extra_body={"seed": 8, **SMALL},
    )
    image = decoded(reply.data[0].b64_json)
    assert image.format == fmt.upper() and image.size == (128, 128)
    assert reply.output_format == fmt
    reference = pixels(Image.open(io.BytesIO(grpc_image(prefill, seed=8, **SMALL))))
    assert np.abs(pixels(image) - reference).mean() < 4


def test_lower_output_compression_gives_a_smaller_jpeg(sdk):
    sizes = [
        len(
            sdk.images.generate(
                prompt=PROMPT,
                size=SIZE,
                output_format="jpeg",
                output_compression=quality,
                extra_body={"seed": 8, **SMALL},
            )
            .data[0]
            .b64_json
        )
        for quality in (20, 95)
    ]
    assert sizes[0] < sizes[1]


def test_models_list_and_retrieve_name_the_served_model(sdk):
    assert [m.id for m in sdk.models.list()] == ["bagel"]
    assert sdk.models.retrieve("bagel").id == "bagel"
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("gpt-image-1")


def test_usage_counts_the_prompts_tokens_as_the_prefill_service_reports_them(sdk, prefill):
    one = sdk.images.generate(prompt=PROMPT, size=SIZE, extra_body={"seed": 1, **SMALL})
    two = sdk.images.generate(prompt=PROMPT, size=SIZE, n=2, extra_body={"seed": 1, **SMALL})
    with BagelClient(prefill.address, timeout=120) as client:
        counted = client.generate(PROMPT, height=128, width=128, seed=1, **SMALL).prompt_tokens
    assert counted > 0
    assert one.usage.input_tokens == counted == one.usage.input_tokens_details.text_tokens
    assert two.usage.input_tokens == 2 * counted


# (call, SDK exception, status, type, words of the message)
REFUSALS = {
    "size 100x100": (
        dict(size="100x100"),
        openai.BadRequestError,
        400,
        "invalid_request_error",
        "height=100 must be a positive multiple of 16",
    ),
    "size not WxH": (
        dict(size="big"),
        openai.BadRequestError,
        400,
        "invalid_request_error",
        "size 'big' is not WIDTHxHEIGHT",
    ),
    "empty prompt": (
        dict(prompt=""),
        openai.BadRequestError,
        400,
        "invalid_request_error",
        "prompt is empty",
    ),
    "n=9": (dict(n=9), openai.BadRequestError, 400, "invalid_request_error", "n: "),
    "unknown model": (
        dict(model="dall-e-3"),
        openai.NotFoundError,
        404,
        "invalid_request_error",
        "the model 'dall-e-3' does not exist",
    ),
    "url": (
        dict(response_format="url"),
        openai.BadRequestError,
        400,
        "invalid_request_error",
        "only b64_json",
    ),
    "schema range": (
        dict(extra_body={"num_timesteps": 1}),
        openai.BadRequestError,
        400,
        "invalid_request_error",
        "num_timesteps",
    ),
    "bad cache spec": (
        dict(extra_body={"cache": "dbcache:nope=1"}),
        openai.BadRequestError,
        400,
        "invalid_request_error",
        "unknown option 'nope'",
    ),
    "unknown field": (
        dict(extra_body={"num_timestep": 4}),
        openai.BadRequestError,
        400,
        "invalid_request_error",
        "unknown field 'num_timestep'",
    ),
    "stream with n=2": (
        dict(stream=True, n=2),
        openai.BadRequestError,
        400,
        "invalid_request_error",
        "n must be 1",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_bad_generation_gets_openais_error_json(sdk, case):
    kwargs, exception, status, kind, words = REFUSALS[case]
    args = {"prompt": PROMPT, "size": SIZE, "extra_body": SMALL, **kwargs}
    with pytest.raises(exception) as err:
        sdk.images.generate(**args)
    assert err.value.status_code == status
    assert err.value.body["type"] == kind, err.value.body
    assert words in err.value.body["message"], err.value.body
    assert set(err.value.body) == {"message", "type", "param", "code"}


def test_an_edit_with_a_mask_is_refused_saying_bagel_edits_by_instruction(sdk):
    png = Image.new("RGB", (64, 64), "white")
    buffer = io.BytesIO()
    png.save(buffer, format="PNG")
    with pytest.raises(openai.BadRequestError) as err:
        sdk.images.edit(
            image=("in.png", buffer.getvalue(), "image/png"),
            mask=("mask.png", buffer.getvalue(), "image/png"),
            prompt="make it blue",
        )
    assert err.value.body["param"] == "mask"
    assert "edits by instruction" in err.value.body["message"]


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"hello, I am text", "is not a PNG or JPEG image"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "is not a PNG or JPEG image"),
        (b"", "input_images[0] is empty"),
    ],
)
def test_a_bad_image_gets_the_fault_the_prefill_service_names(sdk, content, words):
    with pytest.raises(openai.BadRequestError) as err:
        sdk.images.edit(image=("in.txt", content, "text/plain"), prompt="make it blue")
    assert words in err.value.body["message"]
    assert err.value.body["code"] == "invalid_argument"


def test_a_full_queue_gets_429_with_retry_after_and_the_service_keeps_serving(
    sdk, gateway, prefill, diffusion
):
    """The diffusion service runs one job and queues MAX_QUEUE; one more request is
    RESOURCE_EXHAUSTED, which the gateway answers 429 with Retry-After."""
    long = {"prompt": PROMPT, "size": SIZE, "num_timesteps": 1000, "stream": True}
    cancelled = diffusion.log().count("ended by the client: CANCELLED")
    streams = []
    try:
        deadline = time.monotonic() + 30
        while len(streams) < 1 + MAX_QUEUE:
            connection, response = open_post(gateway, "/v1/images/generations", long)
            if response.status == 200:
                streams.append(connection)
                continue
            # the previous test's last job can hold the ranks for a moment after its image
            connection.close()
            assert response.status == 429 and time.monotonic() < deadline, response.status
            time.sleep(0.2)
        with pytest.raises(openai.RateLimitError) as err:
            sdk.images.generate(prompt=PROMPT, size=SIZE, extra_body=SMALL)
        assert err.value.response.headers["retry-after"] == "1"
        assert err.value.body["type"] == "rate_limit_error"
        assert "queue is full" in err.value.body["message"]
    finally:
        for connection in streams:
            connection.close()
    assert wait_for(
        lambda: (
            diffusion.log().count("ended by the client: CANCELLED") >= cancelled + 1 + MAX_QUEUE
        ),
        10,
    )
    reply = sdk.images.generate(prompt=PROMPT, size=SIZE, extra_body={"seed": 2, **SMALL})
    assert png_bytes(reply.data[0].b64_json) == grpc_image(prefill, seed=2, **SMALL)


def test_a_streaming_client_that_disconnects_stops_the_diffusion_work(gateway, diffusion, sdk):
    """Closing the HTTP connection mid-stream cancels the gRPC call: the diffusion service logs
    the client's CANCELLED and is free for the next request within seconds."""
    before = diffusion.log().count("ended by the client: CANCELLED")
    body = {"prompt": PROMPT, "size": SIZE, "num_timesteps": 1000, "stream": True, "seed": 4}
    connection, response = open_post(gateway, "/v1/images/generations", body)
    assert response.status == 200
    time.sleep(1.0)  # a few steps in
    connection.close()  # the connection goes away, not just the call
    assert wait_for(lambda: diffusion.log().count("ended by the client: CANCELLED") > before, 10), (
        diffusion.log()[-2000:]
    )
    started = time.monotonic()
    sdk.images.generate(prompt=PROMPT, size=SIZE, extra_body=SMALL)
    assert time.monotonic() - started < 20  # the abandoned job no longer holds the ranks


def test_a_client_that_disconnects_before_its_json_answer_stops_the_diffusion_work(
    gateway, diffusion
):
    before = diffusion.log().count("ended by the client: CANCELLED")
    body = {"prompt": PROMPT, "size": SIZE, "num_timesteps": 1000, "seed": 4}
    with pytest.raises(TimeoutError):
        open_post(gateway, "/v1/images/generations", body, timeout=1.5)
    assert wait_for(lambda: diffusion.log().count("ended by the client: CANCELLED") > before, 10), (
        diffusion.log()[-2000:]
    )


def test_a_deadline_gets_504(prefill):
    with GatewayProcess(prefill.address, "--request-timeout", "0.5") as gateway:
        gateway.wait_serving()
        with pytest.raises(openai.APIStatusError) as err:
            gateway.sdk().images.generate(
                prompt=PROMPT, size=SIZE, extra_body={"num_timesteps": 1000}
            )
    assert err.value.status_code == 504
    assert err.value.body["type"] == "timeout_error"
    assert err.value.body["code"] == "deadline_exceeded"


def test_a_prefill_service_that_is_down_gets_503_and_ready_says_so():
    with GatewayProcess(f"127.0.0.1:{free_port()}", "--request-timeout", "5") as gateway:
        gateway.wait_serving()
        status, body = http_get(f"{gateway.url}/ready")
        assert status == 503 and b"not ready" in body
        with pytest.raises(openai.InternalServerError) as err:
            gateway.sdk().images.generate(prompt=PROMPT, size=SIZE, extra_body=SMALL)
    assert err.value.status_code == 503
    assert err.value.body["type"] == "service_unavailable_error"


def test_ready_and_health_answer_while_serving(gateway):
    assert http_get(f"{gateway.url}/health") == (200, b'{"status":"ok"}')
    # The prefill service's health follows its once-a-second check of the diffusion service,
    # which a loaded machine can miss; readiness comes back with the next check.
    assert wait_for(lambda: http_get(f"{gateway.url}/ready")[0] == 200, 15)
    assert b'"SERVING"' in http_get(f"{gateway.url}/ready")[1]


def test_an_internal_status_is_a_500_naming_the_request_id():
    import grpc

    error = from_grpc(grpc.StatusCode.DATA_LOSS, "digest mismatch", "req-7", 1)
    assert (error.status, error.type, error.code) == (500, "server_error", "data_loss")
    assert error.message == "digest mismatch (request id req-7)"
    assert from_grpc(grpc.StatusCode.INTERNAL, "boom", "r", 1).status == 500
    assert from_grpc(None, None, "r", 1).status == 500


def test_the_container_health_check_says_ready_only_when_ready(gateway, capsys):
    from gateway.health_check import main

    assert wait_for(lambda: main([gateway.address]) == 0, 15)
    assert '"SERVING"' in capsys.readouterr().out
    assert main([f"127.0.0.1:{free_port()}"]) == 1
    assert "cannot reach" in capsys.readouterr().out
