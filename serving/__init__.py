"""The request schema both services and the client share: `GenerationParams` (the one dataclass
a request's fields are listed in), its proto conversion and validation, and the mapping of
exceptions to gRPC status, with the step-cache policies' configs (`step_cache`). No torch, no
model."""

from serving.errors import InvalidParams, ServiceError, status_of
from serving.params import (
    CACHE_POLICIES,
    DBCache,
    GenerationParams,
    NoCache,
    TeaCache,
)

__all__ = [
    "CACHE_POLICIES",
    "DBCache",
    "GenerationParams",
    "InvalidParams",
    "NoCache",
    "ServiceError",
    "TeaCache",
    "status_of",
]
