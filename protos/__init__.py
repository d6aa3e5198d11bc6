"""The `bagel.v1` wire contract: the `.proto` files and the Python stubs generated from them.

Short names for everything the services use: `from protos import KVHeader, DiffusionStub`. The
modules themselves live in `protos.bagel.v1` (never `bagel.v1`: `bagel` is the model package).
"""

from protos.bagel.v1 import generate_pb2, kv_pb2, params_pb2, service_pb2, service_pb2_grpc
from protos.bagel.v1.generate_pb2 import (
    Accepted,
    ChatMessage,
    ContentPart,
    GenerateEvent,
    GenerateRequest,
    Image,
    Latents,
    ModelInfo,
    ModelInfoRequest,
    PartialImage,
    Progress,
    TextDelta,
    TextFinished,
    Timings,
    UnderstandEvent,
    UnderstandRequest,
    Usage,
)
from protos.bagel.v1.kv_pb2 import (
    ContextInfo,
    ContextKind,
    DiffusionFrame,
    DType,
    KVChunk,
    KVHeader,
    KVTensor,
    KVTrailer,
)
from protos.bagel.v1.params_pb2 import (
    CacheConfig,
    CfgInterval,
    CfgRenormType,
    DBCache,
    GenerationParams,
    NoCache,
    OutputFormat,
    TeaCache,
    TextSampling,
)
from protos.bagel.v1.service_pb2_grpc import (
    DiffusionServicer,
    DiffusionStub,
    PrefillServicer,
    PrefillStub,
    add_DiffusionServicer_to_server,
    add_PrefillServicer_to_server,
)

PREFILL_SERVICE = service_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name
DIFFUSION_SERVICE = service_pb2.DESCRIPTOR.services_by_name["Diffusion"].full_name

__all__ = [
    "ChatMessage",
    "ContentPart",
    "ModelInfo",
    "ModelInfoRequest",
    "PartialImage",
    "TextDelta",
    "TextFinished",
    "TextSampling",
    "UnderstandEvent",
    "UnderstandRequest",
    "Usage",
    "DIFFUSION_SERVICE",
    "PREFILL_SERVICE",
    "Accepted",
    "CacheConfig",
    "CfgInterval",
    "CfgRenormType",
    "ContextInfo",
    "ContextKind",
    "DBCache",
    "DType",
    "DiffusionFrame",
    "DiffusionServicer",
    "DiffusionStub",
    "GenerateEvent",
    "GenerateRequest",
    "GenerationParams",
    "Image",
    "KVChunk",
    "KVHeader",
    "KVTensor",
    "KVTrailer",
    "Latents",
    "NoCache",
    "OutputFormat",
    "PrefillServicer",
    "PrefillStub",
    "Progress",
    "TeaCache",
    "Timings",
    "add_DiffusionServicer_to_server",
    "add_PrefillServicer_to_server",
    "generate_pb2",
    "kv_pb2",
    "params_pb2",
    "service_pb2",
    "service_pb2_grpc",
]
