"""`status_of`: the one place an exception becomes a gRPC status and message."""

from __future__ import annotations

import grpc

from serving.errors import InvalidParams, ServiceError, status_of
from transport import Fault, TransportError


def test_invalid_params_is_invalid_argument_with_its_message():
    assert status_of(InvalidParams("height=1 is bad")) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "height=1 is bad",
    )


def test_a_service_error_ends_with_its_own_code_and_message():
    error = ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
    assert str(error) == error.message == "queue full"
    assert error.code is error.grpc_code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_of(error) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")


def test_a_transport_error_ends_with_the_status_of_its_fault():
    error = TransportError(Fault.CORRUPT, "CRC mismatch")
    assert status_of(error) == (grpc.StatusCode.DATA_LOSS, "CRC mismatch")


def test_any_other_exception_is_internal_and_names_its_type():
    assert status_of(KeyError("x")) == (grpc.StatusCode.INTERNAL, "internal error: KeyError: 'x'")


def test_a_grpc_code_attribute_that_is_not_a_status_code_counts_as_a_bug():
    class Odd(Exception):
        grpc_code = 3

    assert status_of(Odd("y")) == (grpc.StatusCode.INTERNAL, "internal error: Odd: y")


def test_an_error_that_carries_a_message_ends_with_that_message_not_its_str():
    class Detailed(Exception):
        grpc_code = grpc.StatusCode.FAILED_PRECONDITION
        message = "the detail"

    assert status_of(Detailed("the str")) == (grpc.StatusCode.FAILED_PRECONDITION, "the detail")
