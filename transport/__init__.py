"""KV-cache transport: the wire codec (cache <-> `DiffusionFrame` bytes), frame verification into
one flat buffer, the rank-0 -> group broadcast, and gRPC options. Imports torch, grpc and protos
only; never the model.
"""

from protos.options import channel_options, server_options
from transport.admission import Upload, UploadBudget
from transport.assembler import (
    DEFAULT_MAX_KV_BYTES,
    FrameAssembler,
    KVSpec,
    ReceivedKV,
    check_finite,
)
from transport.broadcast import broadcast_kv
from transport.buffers import BufferPool, Buffers, FreshBuffers, tune_malloc
from transport.encoder import KVEncoder, encode_kv, encode_layers
from transport.errors import Fault, TransportError, status_code
from transport.layout import ContextSpec, ContextTensors, ContextViews, KVCache, KVLayout
from transport.rpc import abort, diffusion_generate, diffusion_handler, receive_kv
from transport.wire import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, PROTOCOL_VERSION

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MAX_KV_BYTES",
    "MAX_CHUNK_SIZE",
    "PROTOCOL_VERSION",
    "BufferPool",
    "Buffers",
    "ContextSpec",
    "ContextTensors",
    "ContextViews",
    "Fault",
    "FrameAssembler",
    "FreshBuffers",
    "KVCache",
    "KVEncoder",
    "KVLayout",
    "KVSpec",
    "ReceivedKV",
    "TransportError",
    "Upload",
    "UploadBudget",
    "abort",
    "broadcast_kv",
    "check_finite",
    "channel_options",
    "diffusion_generate",
    "diffusion_handler",
    "encode_kv",
    "encode_layers",
    "receive_kv",
    "server_options",
    "status_code",
    "tune_malloc",
]
