"""The one place that maps what went wrong to a gRPC status code and message."""

from __future__ import annotations

import grpc

from bagel.params import InvalidParams
from transport.errors import TransportError, status_code


class ServiceError(Exception):
    """A failure a servicer reports with a specific status (queue full, shutting down, ...)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, ServiceError):
        return error.code, error.message
    if isinstance(error, TransportError):
        return status_code(error), error.message
    if isinstance(error, InvalidParams):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"
