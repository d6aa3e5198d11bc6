"""What every HTTP request goes through, as one plain ASGI middleware: its request id (the
client's `X-Request-Id` when it is a sane one, else a new one; sent back in `x-request-id`), the
bearer token of the API routes (checked before the body is read), the body limit, the metrics and
one access-log line. Headers are never logged, so neither is a token."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.errors import OpenAIError
from gateway.metrics import GatewayMetrics
from serving.service.security import presented_token, token_accepted

log = logging.getLogger("gateway.access")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
CLIENT_GONE = 499  # nginx's status for a request whose client closed the connection
PROTECTED_PREFIX = "/v1/"  # /health, /ready, /metrics and /docs stay open
MISSING_TOKEN = "missing bearer token: send the header 'Authorization: Bearer <token>'"
INVALID_TOKEN = "invalid bearer token"
ROUTES = frozenset(
    {
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/models",
        "/health",
        "/ready",
        "/metrics",
    }
)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BodyTooLarge(Exception):
    """A body without a Content-Length grew past the limit while it was read."""


def too_large(limit: int) -> OpenAIError:
    return OpenAIError(
        413,
        f"the request body is larger than {limit} bytes",
        "invalid_request_error",
        None,
        "request_too_large",
    )


def refusal(headers: dict[str, str], tokens: tuple[str, ...]) -> OpenAIError | None:
    """The 401 for a request without one of `tokens` (None: let it in; no tokens: all in)."""
    if not tokens:
        return None
    header = headers.get("authorization")
    presented = presented_token([("authorization", header)] if header else [])
    if presented is None:
        return OpenAIError(401, MISSING_TOKEN, "authentication_error", None, "missing_api_key")
    if not token_accepted(presented, tokens):
        return OpenAIError(401, INVALID_TOKEN, "authentication_error", None, "invalid_api_key")
    return None


class RequestMiddleware:
    def __init__(
        self,
        app: Any,
        *,
        max_body_bytes: int,
        metrics: GatewayMetrics,
        tokens: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        offered = headers.get("x-request-id", "")
        request_id = offered if REQUEST_ID.fullmatch(offered) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        outcome = {"status": CLIENT_GONE, "complete": False}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                outcome["status"] = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                outcome["complete"] = True
            await send(message)

        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge
            return message

        try:
            length = headers.get("content-length", "")
            refused = None
            if scope["path"].startswith(PROTECTED_PREFIX):
                refused = refusal(headers, self.tokens)
            if refused is None and length.isdigit() and int(length) > self.max_body_bytes:
                refused = too_large(self.max_body_bytes)
            if refused is not None:
                await refused.response()(scope, receive, send_with_id)
            else:
                await self.app(scope, counted_receive, send_with_id)
        finally:
            status = outcome["status"] if outcome["complete"] else CLIENT_GONE
            route = scope["path"] if scope["path"] in ROUTES else "other"
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(elapsed)
            client = scope.get("client") or ("-", 0)
            log.info(
                "%s %s %s %d %.1f ms request_id=%s",
                client[0],
                scope["method"],
                scope["path"],
                status,
                elapsed * 1000,
                request_id,
            )
