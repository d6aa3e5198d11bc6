"""The 500 row of the error table, end to end: a real gateway process in front of a fake prefill
server that fails with DATA_LOSS or INTERNAL, or ends without an image; the answer names the
request id the gateway sent back, and the gateway keeps serving."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import openai
import pytest

from tests.client import fake_prefill
from tests.client.fake_prefill import FakePrefillServer
from tests.gateway.conftest import GatewayProcess, decoded


@pytest.fixture(scope="module")
def fake() -> Iterator[FakePrefillServer]:
    server = FakePrefillServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(fake: FakePrefillServer) -> Iterator[GatewayProcess]:
    with GatewayProcess(fake.address) as service:
        yield service.wait_serving()


@pytest.mark.parametrize("code", [grpc.StatusCode.DATA_LOSS, grpc.StatusCode.INTERNAL])
def test_a_server_side_failure_is_a_500_naming_the_request_id(fake, gateway, code):
    fake.servicer.fail_with = (code, "the digest of the KV payload does not match")
    try:
        with pytest.raises(openai.InternalServerError) as err:
            gateway.sdk().images.generate(prompt="a cat", size="64x64")
    finally:
        fake.servicer.fail_with = None
    request_id = err.value.response.headers["x-request-id"]
    assert err.value.status_code == 500
    assert err.value.body["type"] == "server_error"
    assert err.value.body["code"] == code.name.lower()
    assert err.value.body["message"] == (
        f"the digest of the KV payload does not match (request id {request_id})"
    )
    reply = gateway.sdk().images.generate(prompt="a cat", size="64x64")
    assert decoded(reply.data[0].b64_json).size == (64, 64)


def test_a_stream_that_ends_without_an_image_is_a_500(monkeypatch):
    monkeypatch.setattr(fake_prefill, "FakePrefill", fake_prefill.NoImagePrefill)
    server = FakePrefillServer()
    try:
        with GatewayProcess(server.address) as gateway:
            gateway.wait_serving()
            with pytest.raises(openai.InternalServerError) as err:
                gateway.sdk().images.generate(prompt="a cat", size="64x64")
    finally:
        server.stop()
    assert err.value.body["type"] == "server_error"
    assert "ended without an image" in err.value.body["message"]
