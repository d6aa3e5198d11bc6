"""Who may call a service: the bearer-token check and, under mTLS, the client certificate names
that may call (`--tls-allowed-clients`). Health and reflection stay open. Every refusal is
counted in `bagel_<service>_auth_failures_total{reason}` and logged, at most once per reason
every `LOG_EVERY_S` (never with the token).

A call without the right token is refused before its request is read: the refusal is a
stream-request handler without a deserializer, so gRPC hands it the call at once instead of
receiving and decoding a unary request first (a 60 MB request would otherwise be read in full).
"""

from __future__ import annotations

import enum
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence

import grpc
from prometheus_client import Counter

from serving.service.security import (
    INVALID_TOKEN,
    MISSING_TOKEN,
    OPEN_SERVICES,
    presented_token,
    token_accepted,
)

LOG_EVERY_S = 10.0
CLIENT_NOT_ALLOWED = "the client certificate is not allowed to call this service"
log = logging.getLogger(__name__)


class Refusal(enum.Enum):
    """Why a call was refused: the `reason` label of the counter."""

    MISSING_TOKEN = "missing_token"
    INVALID_TOKEN = "invalid_token"
    CLIENT_NOT_ALLOWED = "client_not_allowed"


class RefusalLog:
    """Counts every refusal and logs the first of each reason in every `every_s` window, with how
    many went unlogged since, the method and the peer's address."""

    def __init__(
        self,
        counter: Counter | None,
        *,
        every_s: float = LOG_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._counter = counter
        self._every_s = every_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[Refusal, float] = {}
        self._unlogged: dict[Refusal, int] = {}

    def record(self, reason: Refusal, method: str, peer: str, detail: str = "") -> None:
        if self._counter is not None:
            self._counter.labels(reason=reason.value).inc()
        now = self._clock()
        with self._lock:
            last = self._last.get(reason)
            if last is not None and now - last < self._every_s:
                self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
                return
            self._last[reason] = now
            unlogged = self._unlogged.pop(reason, 0)
        since = f" ({unlogged} more since the last such line)" if unlogged else ""
        log.warning(
            "refused %s from %s: %s%s%s",
            method[:200],
            peer[:200],
            reason.value,
            f" ({detail})" if detail else "",
            since,
        )


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Refuses, except on health and reflection: UNAUTHENTICATED without one of `tokens()` (None:
    no token needed), PERMISSION_DENIED to a client certificate none of whose SAN DNS names or
    URIs is in `allowed_clients` (empty: any). `tokens` is read at each call, so a reload
    applies to the next call; calls in flight are not checked again."""

    def __init__(
        self,
        tokens: Callable[[], Sequence[str]] | None,
        refusals: RefusalLog,
        allowed_clients: Sequence[str] = (),
    ) -> None:
        self._tokens = tokens
        self._refusals = refusals
        self._allowed = frozenset(_normal(name) for name in allowed_clients)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)  # finds it, reads nothing
        method = handler_call_details.method or ""
        if handler is None or method.strip("/").split("/")[0] in OPEN_SERVICES:
            return handler
        if self._tokens is not None:
            presented = presented_token(handler_call_details.invocation_metadata)
            if presented is None:
                return self._refusal(Refusal.MISSING_TOKEN, method, MISSING_TOKEN)
            if not token_accepted(presented, self._tokens()):
                return self._refusal(Refusal.INVALID_TOKEN, method, INVALID_TOKEN)
        if not self._allowed:
            return handler
        return self._checking_caller(handler, method)

    def _refusal(self, reason: Refusal, method: str, message: str) -> grpc.RpcMethodHandler:
        """A handler that ends the call UNAUTHENTICATED without reading its request. Whatever the
        method's shape, the client sees only the status (it sends its messages the same way)."""
        refusals = self._refusals

        async def refuse(_requests: object, context: grpc.aio.ServicerContext):
            refusals.record(reason, method, context.peer())
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # an async generator, as a stream-response behaviour must be

        return grpc.stream_stream_rpc_method_handler(refuse)

    def _checking_caller(
        self, handler: grpc.RpcMethodHandler, method: str
    ) -> grpc.RpcMethodHandler:
        """`handler` with the certificate names checked first (the auth context exists only
        inside the call)."""
        allowed, refusals = self._allowed, self._refusals
        behavior = (
            handler.unary_unary
            or handler.unary_stream
            or handler.stream_unary
            or handler.stream_stream
        )

        async def check(context: grpc.aio.ServicerContext) -> None:
            names = caller_names(context.auth_context())
            if not names & allowed:
                shown = ", ".join(sorted(names))[:300] or "none"
                refusals.record(
                    Refusal.CLIENT_NOT_ALLOWED, method, context.peer(), f"names: {shown}"
                )
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{CLIENT_NOT_ALLOWED} (its SAN names: {shown}; see --tls-allowed-clients)",
                )

        if handler.response_streaming:

            async def streaming(request, context):
                await check(context)
                result = behavior(request, context)
                if hasattr(result, "__aiter__"):
                    async for item in result:
                        yield item
                else:
                    for item in result:
                        yield item

            wrapped = streaming
        else:

            async def unary(request, context):
                await check(context)
                result = behavior(request, context)
                return await result if inspect.isawaitable(result) else result

            wrapped = unary
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(handler.request_streaming, handler.response_streaming)]
        return make(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def caller_names(auth_context: dict[str, list[bytes]]) -> frozenset[str]:
    """The SAN DNS names and URIs of the client certificate, as gRPC's TLS layer read them."""
    values = auth_context.get("peer_dns", []) + auth_context.get("peer_uri", [])
    return frozenset(_normal(v.decode("utf-8", "replace")) for v in values)


def _normal(name: str) -> str:
    """DNS names compare without case; URIs as they are (only their scheme and host are
    case-insensitive, and SPIFFE IDs are written in lower case)."""
    return name if "://" in name else name.lower()
