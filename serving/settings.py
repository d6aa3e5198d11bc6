"""The settings both gRPC services take, as flags (`serving.flags`): the checkpoint, metrics, the
drain on SIGTERM, and the server's TLS, mTLS and bearer-token options. Each service's settings
dataclass extends this one with its own fields."""

from __future__ import annotations

from dataclasses import dataclass, field

from serving.flags import group, option
from serving.security import ServerSecurity

DEFAULT_METRICS_HOST = "127.0.0.1"


@dataclass(frozen=True)
class GrpcServiceSettings:
    model_dir: str = field(metadata=option("checkpoint directory", flag="model"))
    metrics_host: str = field(
        default=DEFAULT_METRICS_HOST, metadata=option("address metrics bind to")
    )
    metrics_port: int | None = field(default=None, metadata=option("Prometheus metrics port"))
    drain_s: float = field(
        default=10.0, metadata=option("seconds to finish work on SIGTERM", flag="drain-timeout")
    )
    # TLS/mTLS and the bearer token: --tls-cert, --tls-key, --tls-ca, --auth-token-file, ...
    security: ServerSecurity = field(default_factory=ServerSecurity, metadata=group())
