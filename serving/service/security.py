"""TLS, mTLS and bearer tokens, opt-in on both hops: a service's options and the files they name
(read and checked here, with the start-up refusals and warnings), and what its clients connect
with (the client, the prefill service's link to the diffusion service). With no option set
everything is plaintext and open. Who may call is decided in `serving.service.access`; replacing the
files while a service runs, in `serving.service.credentials`.

A token travels as the metadata `authorization: Bearer <token>`; health and reflection stay open,
so load balancers and `grpcurl list` work without it. The threat model is in docs/security.md.
"""

from __future__ import annotations

import argparse
import collections
import hmac
import ipaddress
import ssl
import stat
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from serving.flags import option

AUTHORIZATION = "authorization"  # gRPC metadata keys are lower case
BEARER = "bearer"
OPEN_SERVICES = (
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)
MISSING_TOKEN = "missing bearer token: send the metadata 'authorization: Bearer <token>'"
INVALID_TOKEN = "invalid bearer token"
# gRPC refuses metadata somewhere between 8 and 16 KiB in all (the limits differ by side and
# version), so a longer token fails valid clients now and then; 4 KiB leaves room for the rest.
MAX_TOKEN_BYTES = 4096
INSECURE_TOKEN_FLAG = "--allow-insecure-token-file"


class SecurityError(ValueError):
    """A TLS or token option that cannot be used (a missing file, an empty token, a certificate
    without its key); raised at start-up, before anything serves, or by a reload (which then
    keeps the credentials it had)."""


def read_token_file(path: str | Path) -> str:
    """The one token in `path` (a client's), surrounding whitespace stripped; refuses an empty
    file, a token over `MAX_TOKEN_BYTES` and one that cannot travel in a header."""
    tokens = _read_tokens(path)
    if len(tokens) > 1:
        raise SecurityError(f"the token file {path} holds {len(tokens)} tokens; a client sends one")
    return tokens[0]


def read_token_set(path: str | Path) -> tuple[str, ...]:
    """The tokens a service accepts: one per non-blank line of `path`, so an old and a new token
    overlap during a rotation. Each is checked like `read_token_file`'s."""
    return _read_tokens(path)


def _read_tokens(path: str | Path) -> tuple[str, ...]:
    try:
        text = Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise SecurityError(f"cannot read the token file {path}: {e}") from None
    tokens = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not tokens:
        raise SecurityError(f"the token file {path} is empty")
    for line, token in enumerate(tokens, 1):
        if not all("!" <= c <= "~" for c in token):
            raise SecurityError(
                f"the token in {path} must be printable ASCII without spaces (it goes in a header)"
            )
        if len(token) > MAX_TOKEN_BYTES:
            raise SecurityError(
                f"token {line} in {path} has {len(token)} bytes; at most {MAX_TOKEN_BYTES} fit "
                "within gRPC's metadata limits on every client"
            )
    return tokens


def check_token_file_mode(path: str | Path, flag: str) -> None:
    """Refuse a token file that every user of the host may read; `flag` names its option."""
    try:
        mode = Path(path).stat().st_mode
    except OSError as e:
        raise SecurityError(f"cannot read the token file {path}: {e}") from None
    if mode & stat.S_IROTH:
        raise SecurityError(
            f"the token file {path} ({flag}) is readable by every user (mode "
            f"{stat.S_IMODE(mode):04o}): chmod 600 it, or pass {INSECURE_TOKEN_FLAG}"
        )


def check_key_pair(cert: str | Path, key: str | Path) -> None:
    """Refuse a certificate and a key that do not belong together (every handshake would fail)."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise SecurityError(f"--tls-cert {cert} and --tls-key {key} are not a pair: {e}") from None


def read_pem(path: str | Path, what: str) -> bytes:
    """The PEM file `path` (`what` names it in errors: "--tls-cert", ...)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SecurityError(f"cannot read {what} {path}: {e}") from None
    if b"-----BEGIN " not in data:
        raise SecurityError(f"{what} {path} is not a PEM file")
    return data


def client_names(text: str) -> tuple[str, ...]:
    """`--tls-allowed-clients`'s comma-separated names."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("name at least one SAN DNS name or URI")
    return names


@dataclass(frozen=True)
class ServerSecurity:
    """A service's own security options, as paths. `tls_cert` + `tls_key`: serve TLS; `tls_ca` as
    well: mTLS (require a client certificate signed by that CA); `auth_token_file`: require one of
    the bearer tokens it holds (one per line) on every call but health and reflection."""

    tls_cert: str | None = option("serve TLS: certificate", default=None, metavar="PEM")
    tls_key: str | None = option("serve TLS: private key", default=None, metavar="PEM")
    tls_ca: str | None = option(
        "mTLS: require client certificates signed by this CA", default=None, metavar="PEM"
    )
    auth_token_file: str | None = option(
        "require 'authorization: Bearer <token>' with a token in FILE, one per line (health "
        "stays open); SIGHUP or a change of the file reloads it, like the TLS files",
        default=None,
        metavar="FILE",
    )
    # mTLS only: the SAN DNS names or URIs of the client certificates that may call.
    allowed_clients: tuple[str, ...] = option(
        "mTLS: only client certificates with one of these SAN DNS names or URIs may call; "
        "others get PERMISSION_DENIED (default: any certificate --tls-ca signed)",
        default=(),
        metavar="NAME[,NAME...]",
        flag="tls-allowed-clients",
        parse=client_names,
    )
    allow_insecure_token_file: bool = option(
        "start even if a token file is readable by every user", default=False
    )

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SecurityError("--tls-cert and --tls-key go together")
        if self.tls_ca is not None and self.tls_cert is None:
            raise SecurityError(
                "--tls-ca (require client certificates) needs --tls-cert and --tls-key"
            )
        if self.allowed_clients and self.tls_ca is None:
            raise SecurityError(
                "--tls-allowed-clients needs mTLS: --tls-ca as well as --tls-cert and --tls-key"
            )

    @property
    def paths(self) -> tuple[str, ...]:
        """The files these options name (what a reload reads again)."""
        names = (self.tls_cert, self.tls_key, self.tls_ca, self.auth_token_file)
        return tuple(p for p in names if p is not None)

    def load(self) -> ServerSecrets:
        """Read and check the files (errors are SecurityError); builds no gRPC object, so it may
        run before the diffusion service forks its ranks. Called at start-up and by every
        reload."""
        if self.auth_token_file and not self.allow_insecure_token_file:
            check_token_file_mode(self.auth_token_file, "--auth-token-file")
        secrets = ServerSecrets(
            certificate=read_pem(self.tls_cert, "--tls-cert") if self.tls_cert else None,
            private_key=read_pem(self.tls_key, "--tls-key") if self.tls_key else None,
            client_ca=read_pem(self.tls_ca, "--tls-ca") if self.tls_ca else None,
            tokens=read_token_set(self.auth_token_file) if self.auth_token_file else (),
        )
        if self.tls_cert and self.tls_key:
            check_key_pair(self.tls_cert, self.tls_key)
        return secrets


@dataclass(frozen=True)
class ServerSecrets:
    """What `ServerSecurity.load` read; `repr` shows none of it."""

    certificate: bytes | None = field(default=None, repr=False)
    private_key: bytes | None = field(default=None, repr=False)
    client_ca: bytes | None = field(default=None, repr=False)
    tokens: tuple[str, ...] = field(default=(), repr=False)

    @property
    def tls(self) -> bool:
        return self.certificate is not None and self.private_key is not None


def token_matches(presented: str, expected: str) -> bool:
    """Constant time in the token's content, so timing tells nothing about a prefix."""
    return hmac.compare_digest(presented.encode(), expected.encode())


def token_accepted(presented: str, accepted: Sequence[str]) -> bool:
    """Whether `presented` is one of `accepted`; every one is compared, so the time taken does not
    tell which one matched."""
    matched = False
    for token in accepted:
        matched |= token_matches(presented, token)
    return matched


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


def is_loopback(address: str) -> bool:
    """Whether an address (HOST:PORT, [V6]:PORT, unix:PATH) reaches this host only."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name may resolve to anything


def risky_settings(listen: str, security: ServerSecurity) -> list[str]:
    """Warnings for settings that serve but expose more than an operator may think."""
    warnings = []
    if security.tls_cert is None:
        if security.auth_token_file is not None:
            warnings.append(
                f"--auth-token-file without --tls-cert: bearer tokens cross {listen} in "
                "plaintext, readable by anyone on the path"
            )
        if not is_loopback(listen):
            warnings.append(
                f"--listen {listen} reaches beyond this host without TLS: prompts, images and KV "
                "caches cross the network in plaintext (docs/security.md)"
            )
    return warnings


@dataclass(frozen=True)
class ClientSecurity:
    """How a client reaches a service, as paths. Any of `tls_ca` / `tls_cert`: TLS (`tls_ca`
    verifies the server; without it the system roots do); `tls_cert` + `tls_key`: present a
    client certificate (mTLS); `auth_token_file`: send its bearer token on every call. As flags,
    a service's link to `{peer}` (`serving.flags.group`)."""

    tls_ca: str | None = option(
        "reach {peer} over TLS, verifying it with this CA", default=None, metavar="PEM"
    )
    tls_cert: str | None = option(
        "client certificate for {peer} when it requires mTLS", default=None, metavar="PEM"
    )
    tls_key: str | None = option(
        "private key of the client certificate", default=None, metavar="PEM"
    )
    auth_token_file: str | None = option(
        "bearer token to send to {peer}", default=None, metavar="FILE"
    )

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SecurityError(
                "--tls-cert and --tls-key (a client certificate and its key) go together"
            )

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None

    @property
    def paths(self) -> tuple[str, ...]:
        """The files these options name (what a reload reads again)."""
        names = (self.tls_ca, self.tls_cert, self.tls_key, self.auth_token_file)
        return tuple(p for p in names if p is not None)

    def read_token(self, private_flag: str | None = None) -> str | None:
        """The token to send (None: no token file). `private_flag`: refuse a token file that
        every user may read, naming it by this flag (a service's own link)."""
        if self.auth_token_file is None:
            return None
        if private_flag is not None:
            check_token_file_mode(self.auth_token_file, private_flag)
        return read_token_file(self.auth_token_file)

    def open_channel(
        self,
        address: str,
        options: Sequence[tuple[str, object]],
        token: TokenHolder | None = None,
    ) -> grpc.Channel:
        """Read the files (errors are SecurityError) and open the channel. With `token`, the
        channel sends what the holder holds at each call instead of the file's token."""
        if token is None:
            read = self.read_token()
            token = None if read is None else TokenHolder(read)
        return open_channel(
            address,
            options,
            tls_ca=self.tls_ca,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
            auth_token=token,
        )


class TokenHolder:
    """The bearer token a channel sends, replaceable while calls run (a rotation)."""

    def __init__(self, token: str) -> None:
        self._lock = threading.Lock()
        self.set(token)

    def set(self, token: str) -> None:
        if not token.strip():
            raise SecurityError("the bearer token is empty")
        with self._lock:
            self._header = f"Bearer {token.strip()}"

    @property
    def header(self) -> str:
        with self._lock:
            return self._header


class _TokenCallCredentials(grpc.AuthMetadataPlugin):
    """Call credentials that read the holder at each call (gRPC's access-token credentials are
    fixed once made)."""

    def __init__(self, holder: TokenHolder) -> None:
        self._holder = holder

    def __call__(self, context, callback) -> None:
        callback(((AUTHORIZATION, self._holder.header),), None)


def open_channel(
    address: str,
    options: Sequence[tuple[str, object]],
    *,
    tls_ca: str | Path | None = None,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    auth_token: str | TokenHolder | None = None,
) -> grpc.Channel:
    """A synchronous channel to `address`: TLS when `tls_ca` or `tls_cert` is given, otherwise
    plaintext. A token goes as call credentials over TLS; over plaintext (gRPC sends no call
    credentials there) as per-call metadata, which is fit only for loopback or a private network."""
    if (tls_cert is None) != (tls_key is None):
        raise SecurityError("a client certificate and its key go together")
    holder = TokenHolder(auth_token) if isinstance(auth_token, str) else auth_token
    if tls_ca is None and tls_cert is None:
        channel = grpc.insecure_channel(address, options=options)
        if holder is None:
            return channel
        return grpc.intercept_channel(channel, BearerTokenMetadata(holder))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read_pem(tls_ca, "the CA certificate") if tls_ca else None,
        private_key=read_pem(tls_key, "the client key") if tls_key else None,
        certificate_chain=read_pem(tls_cert, "the client certificate") if tls_cert else None,
    )
    if holder is not None:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.metadata_call_credentials(_TokenCallCredentials(holder))
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

    def __init__(self, token: TokenHolder) -> None:
        self._token = token

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), (AUTHORIZATION, self._token.header)],
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
