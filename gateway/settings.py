"""The gateway's settings: one dataclass, each field one flag (`serving.flags`), checked once."""

from __future__ import annotations

from dataclasses import dataclass

from serving.flags import group, option
from serving.service.addresses import parse_host_port, split_addresses
from serving.service.security import ClientSecurity, ServerSecurity

DEFAULT_MAX_BODY_BYTES = 32 << 20


@dataclass(frozen=True)
class GatewaySettings:
    """OpenAI-compatible HTTP gateway (Images API) in front of BAGEL prefill services."""

    listen: str = option(
        "HOST:PORT to serve HTTP on (port 0: any free one)",
        default="127.0.0.1:8000",
        metavar="HOST:PORT",
    )
    prefill: str = option(
        "the prefill service; several, comma-separated: each request goes to the one with the "
        "fewest of this gateway's requests in flight",
        default="127.0.0.1:50051",
        metavar="HOST:PORT[,HOST:PORT...]",
    )
    model_name: str = option("the model id /v1/models lists and requests may name", default="bagel")
    max_body_bytes: int = option(
        "largest request body accepted, in bytes (larger: 413)", default=DEFAULT_MAX_BODY_BYTES
    )
    max_concurrency: int = option(
        "image requests in flight beyond which a request gets 429", default=16
    )
    request_timeout: float | None = option(
        "deadline of each prefill call in seconds (unset: none)", default=None, metavar="S"
    )
    retry_after: int = option("seconds a 429 answer's Retry-After asks a client to wait", default=1)
    auth_token_file: str | None = option(
        "require 'Authorization: Bearer <token>' with one of the tokens in FILE, one per line "
        "(/health, /ready, /metrics and /docs stay open)",
        default=None,
        metavar="FILE",
    )
    allow_insecure_token_file: bool = option(
        "start even if --auth-token-file is readable by every user", default=False
    )
    tls_cert: str | None = option("serve HTTPS: certificate", default=None, metavar="PEM")
    tls_key: str | None = option("serve HTTPS: private key", default=None, metavar="PEM")
    # The hop's TLS and token: --prefill-tls-ca, --prefill-tls-cert, ...
    prefill_security: ClientSecurity = group(
        ClientSecurity, prefix="prefill-", peer="the prefill service"
    )

    def __post_init__(self) -> None:
        """ValueError (or SecurityError, a ValueError) with one line naming the bad setting."""
        parse_host_port(self.listen, "--listen")
        split_addresses(self.prefill, "--prefill")
        if not self.model_name.strip():
            raise ValueError("--model-name is empty")
        for name in ("max_body_bytes", "max_concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if self.retry_after < 0:
            raise ValueError("--retry-after must be 0 or more")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise ValueError("--request-timeout must be positive")
        self.server_security()

    @property
    def prefill_addresses(self) -> tuple[str, ...]:
        return split_addresses(self.prefill, "--prefill")

    def server_security(self) -> ServerSecurity:
        return ServerSecurity(
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
            auth_token_file=self.auth_token_file,
            allow_insecure_token_file=self.allow_insecure_token_file,
        )
