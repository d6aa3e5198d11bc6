"""The settings both gRPC services take, as flags (`serving.flags`): the checkpoint, metrics, the
drain on SIGTERM, and the server's TLS, mTLS and bearer-token options. Each service's settings
dataclass extends this one with its own fields."""

from __future__ import annotations

from dataclasses import dataclass

from serving.flags import group, option
from serving.service.security import ServerSecurity

DEFAULT_METRICS_HOST = "127.0.0.1"


@dataclass(frozen=True)
class GrpcServiceSettings:
    model_dir: str = option("checkpoint directory", flag="model")
    metrics_host: str = option("address metrics bind to", default=DEFAULT_METRICS_HOST)
    metrics_port: int | None = option("Prometheus metrics port", default=None)
    drain_s: float = option("seconds to finish work on SIGTERM", default=10.0, flag="drain-timeout")
    # TLS/mTLS and the bearer token: --tls-cert, --tls-key, --tls-ca, --auth-token-file, ...
    security: ServerSecurity = group(ServerSecurity)
