"""`BagelClient` raises one typed exception per status, carrying the status, the server's
message and the request id; they stay `grpc.RpcError`s for callers that catch that."""

from __future__ import annotations

import grpc
import pytest

from client import BagelClient
from client.client import EventStream
from client.errors import (
    ERRORS_BY_STATUS,
    BagelError,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    error_from_rpc,
)
from tests.client.fake_prefill import FakePrefillServer


@pytest.fixture
def fake():
    server = FakePrefillServer()
    yield server
    server.stop()


@pytest.mark.parametrize("code", sorted(ERRORS_BY_STATUS, key=lambda c: c.name))
def test_each_status_becomes_its_own_exception_with_status_message_and_request_id(fake, code):
    fake.servicer.fail_with = (code, f"it went {code.name}")
    with BagelClient(fake.address) as client, pytest.raises(BagelError) as info:
        client.generate("A cute cat", request_id="req-7", width=32, height=32)
    error = info.value
    assert type(error) is ERRORS_BY_STATUS[code]
    assert isinstance(error, grpc.RpcError)
    assert (error.status, error.code()) == (code, code)
    assert (error.message, error.details()) == (f"it went {code.name}",) * 2
    assert error.request_id == "req-7"
    assert str(error) == f"{code.name}: it went {code.name} (request req-7)"


def test_the_classes_cover_the_statuses_the_services_end_calls_with():
    assert ERRORS_BY_STATUS[grpc.StatusCode.INVALID_ARGUMENT] is InvalidArgument
    assert ERRORS_BY_STATUS[grpc.StatusCode.UNAVAILABLE] is Unavailable
    assert ERRORS_BY_STATUS[grpc.StatusCode.RESOURCE_EXHAUSTED] is ResourceExhausted
    assert {c.name for c in ERRORS_BY_STATUS} >= {
        "INVALID_ARGUMENT", "UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "RESOURCE_EXHAUSTED",
        "DATA_LOSS", "UNAUTHENTICATED", "INTERNAL",
    }  # fmt: skip


def test_a_failure_after_accepted_carries_the_servers_request_id(fake):
    fake.servicer.steps, fake.servicer.step_delay_s = 100, 0.05
    with BagelClient(fake.address, timeout=0.5) as client, pytest.raises(DeadlineExceeded) as info:
        client.generate("A cute cat", width=32, height=32)
    assert info.value.request_id == "srv-1"


def test_an_unreachable_server_is_unavailable_for_generate_and_health():
    with BagelClient("127.0.0.1:1", timeout=2) as client:
        with pytest.raises(Unavailable):
            client.generate("A cute cat", width=32, height=32)
        with pytest.raises(Unavailable):
            client.health()
        with pytest.raises(Unavailable):
            client.model_info()


def test_a_status_without_its_own_class_is_a_plain_bagel_error():
    class Rpc(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.ABORTED

        def details(self):
            return "aborted"

    error = error_from_rpc(Rpc(), "r1")
    assert type(error) is BagelError and error.code() is grpc.StatusCode.ABORTED
    assert str(error) == "ABORTED: aborted (request r1)"


def test_an_rpc_error_without_a_status_is_unknown_with_its_text():
    error = error_from_rpc(grpc.RpcError("socket closed"))
    assert type(error) is BagelError and error.code() is grpc.StatusCode.UNKNOWN
    assert (error.details(), error.request_id, error.args) == (
        "socket closed",
        "",
        ("socket closed",),
    )
    assert str(error) == "UNKNOWN: socket closed"


def test_an_rpc_error_with_empty_details_is_described_by_its_text():
    class Quiet(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.INTERNAL

        def details(self):
            return ""

    error = error_from_rpc(Quiet("stream reset"))
    assert type(error) is Internal and error.details() == "stream reset"


def test_a_bagel_error_is_passed_through_and_a_stream_starts_without_a_request_id():
    error = Unavailable("loading")
    assert error_from_rpc(error, "r-1") is error and error.request_id == ""
    assert EventStream(iter(())).request_id == ""
