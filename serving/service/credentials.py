"""Credentials replaced while a service runs: on SIGHUP, and when a file they came from changes
(its inode, size or modification time, looked at every `POLL_S`), the certificates, keys, CA and
token files are read and checked again. A file that fails the checks (half written, a key that is
not the certificate's) changes nothing: the service logs why and keeps what it had.

Calls in flight are unaffected: a token is checked when a call starts, and a new server
certificate applies to the next TLS handshake (gRPC asks `dynamic_ssl_server_credentials`' fetcher
at each one); connections already open keep theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Sequence
from typing import Protocol

import grpc

from serving.service.access import AccessInterceptor, RefusalLog
from serving.service.security import (
    ClientSecurity,
    SecurityError,
    ServerSecrets,
    ServerSecurity,
    TokenHolder,
)

POLL_S = 2.0
log = logging.getLogger(__name__)


class Reloadable(Protocol):
    """Something that reads files and can read them again."""

    @property
    def paths(self) -> tuple[str, ...]: ...

    def reload(self) -> bool: ...


class ServerCredentialStore:
    """A service's own credentials: its TLS certificate and key, its client CA and its accepted
    tokens, as last read. Make it after the diffusion service's fork (it builds gRPC objects only
    when asked)."""

    def __init__(self, security: ServerSecurity, secrets: ServerSecrets | None = None) -> None:
        self.security = security
        self._secrets = secrets if secrets is not None else security.load()
        self._pending: grpc.ServerCertificateConfiguration | None = None

    @property
    def paths(self) -> tuple[str, ...]:
        return self.security.paths

    @property
    def tokens(self) -> tuple[str, ...]:
        return self._secrets.tokens

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS (mTLS with a client CA) credentials that follow reloads, or None for plaintext."""
        if not self._secrets.tls:
            return None
        return grpc.dynamic_ssl_server_credentials(
            _configuration(self._secrets),
            self._next_configuration,
            require_client_authentication=self._secrets.client_ca is not None,
        )

    def interceptors(self, refusals: RefusalLog) -> list[grpc.aio.ServerInterceptor]:
        """The access check, when there is anything to check."""
        security = self.security
        if security.auth_token_file is None and not security.allowed_clients:
            return []
        tokens = (lambda: self._secrets.tokens) if security.auth_token_file else None
        return [AccessInterceptor(tokens, refusals, security.allowed_clients)]

    def _next_configuration(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher, on a handshake: a new configuration once after a reload, else None
        (keep the current one)."""
        configuration, self._pending = self._pending, None
        return configuration

    def reload(self) -> bool:
        """Read the files again; returns whether they loaded (else the old ones stay)."""
        try:
            secrets = self.security.load()
        except SecurityError as e:
            log.error("credentials not reloaded, the previous ones stay: %s", e)
            return False
        tls_changed = (secrets.certificate, secrets.private_key, secrets.client_ca) != (
            self._secrets.certificate,
            self._secrets.private_key,
            self._secrets.client_ca,
        )
        if tls_changed and secrets.tls:
            self._pending = _configuration(secrets)
        self._secrets = secrets
        log.info(
            "credentials reloaded: %s%d accepted token(s)",
            "new TLS files for the next handshakes, " if tls_changed else "",
            len(secrets.tokens),
        )
        return True


def _configuration(secrets: ServerSecrets) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(secrets.private_key, secrets.certificate)], root_certificates=secrets.client_ca
    )


class ClientCredentialStore:
    """The credentials of a service's link to another (the prefill service's to the diffusion
    service): the token goes through a `TokenHolder`, so a reload reaches the next call on the
    same channel; new TLS files need a new channel, which `on_tls_change` is given.
    `private_flag`: refuse a token file that every user may read, naming it by this flag."""

    def __init__(
        self,
        security: ClientSecurity,
        on_tls_change: Callable[[], None] | None = None,
        private_flag: str | None = None,
    ) -> None:
        self.security = security
        self._private_flag = private_flag
        token = security.read_token(private_flag)
        self.token = None if token is None else TokenHolder(token)
        self._on_tls_change = on_tls_change
        self._tls = _read_all(security.tls_ca, security.tls_cert, security.tls_key)

    @property
    def paths(self) -> tuple[str, ...]:
        return self.security.paths

    def reload(self) -> bool:
        try:
            token = self.security.read_token(self._private_flag)
            tls = _read_all(self.security.tls_ca, self.security.tls_cert, self.security.tls_key)
        except (SecurityError, OSError) as e:
            log.error("link credentials not reloaded, the previous ones stay: %s", e)
            return False
        if token is not None and self.token is not None:
            self.token.set(token)
        tls_changed = tls != self._tls
        self._tls = tls
        if tls_changed and self._on_tls_change is not None:
            self._on_tls_change()
        log.info("link credentials reloaded%s", " (new TLS files: a new channel)" * tls_changed)
        return True


def _read_all(*paths: str | None) -> tuple[bytes | None, ...]:
    return tuple(None if p is None else open(p, "rb").read() for p in paths)  # noqa: SIM115


def file_signature(paths: Sequence[str]) -> tuple:
    """What changes when a file is replaced or rewritten (a missing file reads as None)."""
    signature = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            signature.append(None)
            continue
        signature.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(signature)


class CredentialReloader:
    """Reloads every store on SIGHUP and when one of its files changes. `start` on the event loop
    that serves; `stop` before it closes."""

    def __init__(self, stores: Sequence[Reloadable], poll_s: float = POLL_S) -> None:
        self.stores = [s for s in stores if s.paths]
        self.poll_s = poll_s
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def reload(self) -> bool:
        return all([store.reload() for store in self.stores])

    def start(self) -> None:
        if not self.stores:
            return
        self._loop = asyncio.get_running_loop()
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            # only the main thread may take signals (tests run servers on other threads)
            self._loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        self._task = asyncio.ensure_future(self._watch())

    def _on_sighup(self) -> None:
        log.info("SIGHUP: reloading credentials")
        self.reload()

    async def _watch(self) -> None:
        seen = [file_signature(s.paths) for s in self.stores]
        while True:
            await asyncio.sleep(self.poll_s)
            for i, store in enumerate(self.stores):
                now = file_signature(store.paths)
                if now != seen[i]:
                    seen[i] = now
                    log.info("credential files changed: reloading")
                    store.reload()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._loop is not None:
            with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                self._loop.remove_signal_handler(signal.SIGHUP)
