"""The exceptions `BagelClient` raises for a failed call: one class per gRPC status a BAGEL
service ends a call with, each carrying the status, the server's message and the request id
(empty when the call failed before the server assigned one).

They subclass `grpc.RpcError` (with its `code()` and `details()`), so code that catches that
keeps working; new code catches `InvalidArgument`, `Unavailable`, ... or `BagelError`.
"""

from __future__ import annotations

import grpc


class BagelError(grpc.RpcError):
    """A call that ended with a status other than OK."""

    status: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, request_id: str = "", status: grpc.StatusCode | None = None):
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        if status is not None:
            self.status = status

    def code(self) -> grpc.StatusCode:
        return self.status

    def details(self) -> str:
        return self.message

    def __str__(self) -> str:
        where = f" (request {self.request_id})" if self.request_id else ""
        return f"{self.status.name}: {self.message}{where}"


class InvalidArgument(BagelError):
    """A parameter, prompt or input image the service refuses; the message names it."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class Unavailable(BagelError):
    """The service cannot take the call now (loading, restarting, unreachable): retry later."""

    status = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(BagelError):
    status = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(BagelError):
    status = grpc.StatusCode.CANCELLED


class ResourceExhausted(BagelError):
    """The queue is full, or the request's KV cache is larger than the service accepts."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class DataLoss(BagelError):
    """The KV cache or the latents were corrupted on the way (CRC, digest, NaN or Inf)."""

    status = grpc.StatusCode.DATA_LOSS


class Unauthenticated(BagelError):
    status = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(BagelError):
    status = grpc.StatusCode.PERMISSION_DENIED


class Unimplemented(BagelError):
    """The server does not serve this RPC (e.g. an older or third-party prefill engine)."""

    status = grpc.StatusCode.UNIMPLEMENTED


class Internal(BagelError):
    """A fault of the service's own; its log has the details."""

    status = grpc.StatusCode.INTERNAL


ERRORS_BY_STATUS: dict[grpc.StatusCode, type[BagelError]] = {
    cls.status: cls
    for cls in (
        InvalidArgument,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        ResourceExhausted,
        DataLoss,
        Unauthenticated,
        PermissionDenied,
        Unimplemented,
        Internal,
    )
}


def error_from_rpc(error: grpc.RpcError, request_id: str = "") -> BagelError:
    """The typed exception for a failed gRPC call (`BagelError` itself for other statuses)."""
    if isinstance(error, BagelError):
        return error
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    return ERRORS_BY_STATUS.get(code, BagelError)(details, request_id, code)
