"""Send a KV cache straight to a diffusion service, as any prefill engine would."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import grpc
import numpy as np
import torch

from bagel.model import ContextKV
from bagel.params import GenerationParams
from protos.options import channel_options
from transport.encoder import encode_kv
from transport.layout import KVContext
from transport.params import RequestOptions, options_to_proto
from transport.rpc import diffusion_generate


def kv_frames(
    contexts: Mapping[str, ContextKV],
    fingerprint: str,
    params: GenerationParams,
    request_id: str = "test",
    latents_only: bool = False,
) -> Iterator[bytes]:
    kv = [KVContext(kind, c.keys, c.values, c.next_position) for kind, c in contexts.items()]
    proto = options_to_proto(RequestOptions(params, latents_only=latents_only))
    return encode_kv(kv, request_id=request_id, fingerprint=fingerprint, params=proto)


def generate(address: str, frames, timeout: float = 60.0) -> list:
    with grpc.insecure_channel(address, options=channel_options()) as channel:
        return list(diffusion_generate(channel)(frames, timeout=timeout))


def latents_of(events) -> torch.Tensor:
    (latents,) = [e.latents for e in events if e.WhichOneof("event") == "latents"]
    array = np.frombuffer(latents.data, dtype="<f4").reshape(tuple(latents.shape))
    return torch.from_numpy(array.copy())
