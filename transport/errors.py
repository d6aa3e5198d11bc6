"""The one error type of the KV transport, and the one place that maps it to a gRPC status."""

from __future__ import annotations

import enum

import grpc


class Fault(enum.Enum):
    """What kind of fault a `TransportError` reports; decides its gRPC status."""

    CORRUPT = "corrupt"  # bytes changed in flight: CRC or payload digest mismatch
    CONTRACT = "contract"  # the sender broke the wire contract: version, shapes, order, ...
    TOO_LARGE = "too_large"  # the declared payload exceeds the receiver's limit
    UNAVAILABLE = "unavailable"  # a peer rank did not take part in a collective in time
    IDLE = "idle"  # the sender stopped sending frames and left the stream open
    BUSY = "busy"  # uploads in flight already hold the receiver's byte budget
    EVICTED = "evicted"  # a stale upload gave its room to another (transport.admission)
    NOT_FINITE = "not_finite"  # the payload holds NaN or Inf (its checksums were fine)


_STATUS = {
    Fault.CORRUPT: grpc.StatusCode.DATA_LOSS,
    Fault.CONTRACT: grpc.StatusCode.INVALID_ARGUMENT,
    Fault.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Fault.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Fault.IDLE: grpc.StatusCode.DEADLINE_EXCEEDED,
    Fault.BUSY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Fault.EVICTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Fault.NOT_FINITE: grpc.StatusCode.INVALID_ARGUMENT,
}


class TransportError(Exception):
    """A KV stream or broadcast failed; `fault` says how, the message says exactly what."""

    def __init__(self, fault: Fault, message: str) -> None:
        super().__init__(message)
        self.fault = fault
        self.message = message

    @property
    def grpc_code(self) -> grpc.StatusCode:
        """The status this error ends a call with (read by `serving.errors.status_of`)."""
        return _STATUS[self.fault]

    def __repr__(self) -> str:
        return f"TransportError({self.fault.name}, {self.message!r})"


def status_code(error: TransportError) -> grpc.StatusCode:
    """The gRPC status a server answers with when `error` ends a call."""
    return _STATUS[error.fault]
