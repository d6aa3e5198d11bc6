"""OpenAI's error JSON, `{"error": {"message", "type", "param", "code"}}`, and the one table that
maps a gRPC status of the prefill service to an HTTP status and error type."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from fastapi.responses import JSONResponse


@dataclass
class OpenAIError(Exception):
    """An answer with an error: raised anywhere in a request, turned into JSON in one place."""

    status: int
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param, code)


# gRPC status -> (HTTP status, OpenAI error type); any other status is a 500 server_error.
GRPC_TO_HTTP: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}


def from_grpc(
    code: grpc.StatusCode | None, details: str | None, request_id: str, retry_after_s: int
) -> OpenAIError:
    """The answer to a prefill call that ended with `code`; `code` is the status name in lower
    case (`resource_exhausted`, ...). A 500 names the request id, for the logs."""
    code = code or grpc.StatusCode.UNKNOWN
    details = details or code.name
    http_status, kind = GRPC_TO_HTTP.get(code, (500, "server_error"))
    headers = {"Retry-After": str(retry_after_s)} if http_status == 429 else {}
    if http_status == 500:
        details = f"{details} (request id {request_id})"
    return OpenAIError(http_status, details, kind, None, code.name.lower(), headers)
