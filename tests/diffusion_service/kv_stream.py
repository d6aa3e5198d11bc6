"""Send a KV cache straight to a diffusion service, as any prefill engine would."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import grpc
import numpy as np
import torch

from bagel.network.kv import Branch, ContextKV
from protos.options import channel_options
from serving.params import GenerationParams
from transport.encoder import encode_kv
from transport.rpc import diffusion_generate


def kv_frames(
    contexts: Mapping[Branch, ContextKV],
    fingerprint: str,
    params: GenerationParams,
    request_id: str = "test",
    latents_only: bool = False,
) -> Iterator[bytes]:
    if latents_only:
        params = dataclasses.replace(params, output_format="latents")
    return encode_kv(
        contexts, request_id=request_id, fingerprint=fingerprint, params=params.to_proto()
    )


def generate(address: str, frames, timeout: float = 60.0) -> list:
    with grpc.insecure_channel(address, options=channel_options()) as channel:
        return list(diffusion_generate(channel)(frames, timeout=timeout))


def latents_of(events) -> torch.Tensor:
    (latents,) = [e.latents for e in events if e.WhichOneof("event") == "latents"]
    array = np.frombuffer(latents.data, dtype="<f4").reshape(tuple(latents.shape))
    return torch.from_numpy(array.copy())
