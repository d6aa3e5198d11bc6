"""The request schema both services, the client and the gateway share: `GenerationParams` (the
one dataclass a request's fields are listed in, `serving.params`), its codecs and the text
sampling schema, with the step-cache policies' configs (`step_cache`), and the errors every layer
raises with their gRPC status (`serving.errors`). No torch, no model. Beside it:
`serving.imaging` (input images, PNG encoding), `serving.service` (what a gRPC service of ours
is made of) and the command-line plumbing (`serving.settings`, `serving.flags`)."""

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
