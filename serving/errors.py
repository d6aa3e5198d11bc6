"""Errors a servicer reports with a specific gRPC status, and the one place that maps any
exception to a status code and message."""

from __future__ import annotations

import grpc


class InvalidParams(ValueError):
    """A request field is out of range or malformed; the message names the field."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class ServiceError(Exception):
    """A failure a servicer reports with a specific status (queue full, shutting down, ...)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.grpc_code = code
        self.message = message

    @property
    def code(self) -> grpc.StatusCode:
        return self.grpc_code


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status a call that failed with `error` ends with. An exception states its own status
    through a `grpc_code` attribute (ours, and `transport.TransportError`); anything else is a
    bug of ours and INTERNAL."""
    code = getattr(error, "grpc_code", None)
    if isinstance(code, grpc.StatusCode):
        return code, getattr(error, "message", None) or str(error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"
