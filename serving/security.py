"""TLS, mTLS and bearer tokens, opt-in on both hops: what a service serves with (server credentials,
a token-checking interceptor) and what its clients connect with (the client, the prefill service's
link to the diffusion service). With no option set everything is plaintext and open.

A token travels as the metadata `authorization: Bearer <token>`; health and reflection stay open,
so load balancers and `grpcurl list` work without it. The threat model is in docs/security.md.
"""

from __future__ import annotations

import collections
import hmac
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

AUTHORIZATION = "authorization"  # gRPC metadata keys are lower case
BEARER = "bearer"
OPEN_SERVICES = (
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)
MISSING_TOKEN = "missing bearer token: send the metadata 'authorization: Bearer <token>'"
INVALID_TOKEN = "invalid bearer token"


class SecurityError(ValueError):
    """A TLS or token option that cannot be used (a missing file, an empty token, a certificate
    without its key); raised at start-up, before anything serves."""


def read_token_file(path: str | Path) -> str:
    """The token in `path`, surrounding whitespace stripped; refuses an empty file and a token
    that cannot travel in a header (only printable ASCII without spaces)."""
    try:
        token = Path(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise SecurityError(f"cannot read the token file {path}: {e}") from None
    if not token:
        raise SecurityError(f"the token file {path} is empty")
    if not all("!" <= c <= "~" for c in token):
        raise SecurityError(
            f"the token in {path} must be printable ASCII without spaces (it goes in a header)"
        )
    return token


def read_token_lines(path: str | Path) -> tuple[str, ...]:
    """Every token in `path`, one per line (several are valid at once, so a token can be rotated
    without downtime); blank lines are skipped. Refuses a file with none and a token that cannot
    travel in a header."""
    try:
        lines = Path(path).read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SecurityError(f"cannot read the token file {path}: {e}") from None
    tokens = tuple(line.strip() for line in lines if line.strip())
    if not tokens:
        raise SecurityError(f"the token file {path} is empty")
    for number, token in enumerate(tokens, 1):
        if not all("!" <= c <= "~" for c in token):
            raise SecurityError(
                f"token {number} in {path} must be printable ASCII without spaces (it goes in "
                "a header)"
            )
    return tokens


def any_token_matches(presented: str, expected: Sequence[str]) -> bool:
    """`token_matches` against every expected token, all of them compared, so the time taken does
    not tell which one (or whether an early one) matched."""
    matched = False
    for token in expected:
        matched |= token_matches(presented, token)
    return matched


def read_pem(path: str | Path, what: str) -> bytes:
    """The PEM file `path` (`what` names it in errors: "--tls-cert", ...)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SecurityError(f"cannot read {what} {path}: {e}") from None
    if b"-----BEGIN " not in data:
        raise SecurityError(f"{what} {path} is not a PEM file")
    return data


@dataclass(frozen=True)
class ServerSecurity:
    """A service's own security options, as paths. `tls_cert` + `tls_key`: serve TLS; `tls_ca` as
    well: mTLS (require a client certificate signed by that CA); `auth_token_file`: require the
    bearer token it holds on every call but health and reflection."""

    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    auth_token_file: str | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SecurityError("--tls-cert and --tls-key go together")
        if self.tls_ca is not None and self.tls_cert is None:
            raise SecurityError(
                "--tls-ca (require client certificates) needs --tls-cert and --tls-key"
            )

    def load(self) -> ServerSecrets:
        """Read the files once (start-up errors are SecurityError); builds no gRPC object, so it
        may run before the diffusion service forks its ranks."""
        return ServerSecrets(
            certificate=read_pem(self.tls_cert, "--tls-cert") if self.tls_cert else None,
            private_key=read_pem(self.tls_key, "--tls-key") if self.tls_key else None,
            client_ca=read_pem(self.tls_ca, "--tls-ca") if self.tls_ca else None,
            token=read_token_file(self.auth_token_file) if self.auth_token_file else None,
        )


@dataclass(frozen=True)
class ServerSecrets:
    """What `ServerSecurity.load` read; `repr` shows none of it."""

    certificate: bytes | None = field(default=None, repr=False)
    private_key: bytes | None = field(default=None, repr=False)
    client_ca: bytes | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    def credentials(self) -> grpc.ServerCredentials | None:
        """TLS (mTLS with a client CA) credentials, or None for plaintext."""
        if self.certificate is None or self.private_key is None:
            return None
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [BearerTokenInterceptor(self.token)] if self.token is not None else []


def token_matches(presented: str, expected: str) -> bool:
    """Constant time in the token's content, so timing tells nothing about a prefix."""
    return hmac.compare_digest(presented.encode(), expected.encode())


def presented_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The bearer token of `authorization` metadata, or None when there is none."""
    for key, value in metadata or ():
        if key.lower() != AUTHORIZATION:
            continue
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == BEARER and token.strip():
            return token.strip()
    return None


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Answers UNAUTHENTICATED to a call without the right bearer token, except to health and
    reflection. The message never repeats what the caller sent."""

    def __init__(self, token: str) -> None:
        if not token:
            raise SecurityError("the bearer token is empty")
        self._token = token

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.strip("/").split("/")[0] in OPEN_SERVICES:
            return handler
        presented = presented_token(handler_call_details.invocation_metadata)
        if presented is None:
            return _refusal(handler, MISSING_TOKEN)
        if not token_matches(presented, self._token):
            return _refusal(handler, INVALID_TOKEN)
        return handler


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends the call UNAUTHENTICATED, unread."""

    async def refuse(_request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


@dataclass(frozen=True)
class ClientSecurity:
    """How a client reaches a service, as paths. Any of `tls_ca` / `tls_cert`: TLS (`tls_ca`
    verifies the server; without it the system roots do); `tls_cert` + `tls_key`: present a
    client certificate (mTLS); `auth_token_file`: send its bearer token on every call."""

    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    auth_token_file: str | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SecurityError("a client certificate and its key go together")

    def open_channel(self, address: str, options: Sequence[tuple[str, object]]) -> grpc.Channel:
        """Read the files (errors are SecurityError) and open the channel."""
        token = read_token_file(self.auth_token_file) if self.auth_token_file else None
        return open_channel(
            address,
            options,
            tls_ca=self.tls_ca,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
            auth_token=token,
        )


def open_channel(
    address: str,
    options: Sequence[tuple[str, object]],
    *,
    tls_ca: str | Path | None = None,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    auth_token: str | None = None,
) -> grpc.Channel:
    """A synchronous channel to `address`: TLS when `tls_ca` or `tls_cert` is given, otherwise
    plaintext. A token goes as call credentials over TLS; over plaintext (gRPC sends no call
    credentials there) as per-call metadata, which is fit only for loopback or a private network."""
    if (tls_cert is None) != (tls_key is None):
        raise SecurityError("a client certificate and its key go together")
    if auth_token is not None and not auth_token.strip():
        raise SecurityError("the bearer token is empty")
    if tls_ca is None and tls_cert is None:
        channel = grpc.insecure_channel(address, options=options)
        if auth_token is None:
            return channel
        return grpc.intercept_channel(channel, BearerTokenMetadata(auth_token.strip()))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read_pem(tls_ca, "the CA certificate") if tls_ca else None,
        private_key=read_pem(tls_key, "the client key") if tls_key else None,
        certificate_chain=read_pem(tls_cert, "the client certificate") if tls_cert else None,
    )
    if auth_token is not None:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(auth_token.strip())
        )
    return grpc.secure_channel(address, credentials, options=options)


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class BearerTokenMetadata(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call of a plaintext channel."""

    def __init__(self, token: str) -> None:
        self._header = (AUTHORIZATION, f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), self._header],
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._with_token(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._with_token(client_call_details), request_iterator)


def open_aio_channel(
    address: str,
    options: Sequence[tuple[str, object]],
    *,
    tls_ca: str | Path | None = None,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    auth_token: str | None = None,
) -> tuple[grpc.aio.Channel, tuple[tuple[str, str], ...]]:
    """An asyncio channel to `address`, as `open_channel` makes a synchronous one, and the
    metadata every call on it must send: over TLS a token travels as call credentials (no
    metadata); over plaintext as `authorization` metadata, fit only for loopback or a private
    network."""
    if (tls_cert is None) != (tls_key is None):
        raise SecurityError("a client certificate and its key go together")
    if auth_token is not None and not auth_token.strip():
        raise SecurityError("the bearer token is empty")
    if tls_ca is None and tls_cert is None:
        channel = grpc.aio.insecure_channel(address, options=options)
        if auth_token is None:
            return channel, ()
        return channel, ((AUTHORIZATION, f"Bearer {auth_token.strip()}"),)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read_pem(tls_ca, "the CA certificate") if tls_ca else None,
        private_key=read_pem(tls_key, "the client key") if tls_key else None,
        certificate_chain=read_pem(tls_cert, "the client certificate") if tls_cert else None,
    )
    if auth_token is not None:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(auth_token.strip())
        )
    return grpc.aio.secure_channel(address, credentials, options=options), ()
