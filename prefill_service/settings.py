"""The prefill service's settings: one dataclass, each field one flag (`serving.flags`), checked
once. `PrefillSettings` is what the server reads (the real service and `prefill_service.mock`
share it); `ModelPrefillSettings` adds the language model's options."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from prefill_service.prefill import DEFAULT_MAX_PROMPT_TOKENS
from prefill_service.relay import DEFAULT_CONNECT_TIMEOUT_S
from prefill_service.routing import split_addresses
from prefill_service.text import DEFAULT_MAX_BATCH, DEFAULT_MAX_TOKENS
from serving import flags
from serving.flags import group, option
from serving.service.cuda_allocator import cuda_allocator_option
from serving.service.security import ClientSecurity
from serving.settings import GrpcServiceSettings
from transport import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE


@dataclass(frozen=True)
class PrefillSettings(GrpcServiceSettings):
    listen: str = option("HOST:PORT to serve on", default="127.0.0.1:50051")
    diffusion: str = option(
        "the diffusion service; several, comma-separated: each request goes to the serving one "
        "with the fewest of this service's requests in flight",
        default="127.0.0.1:50052",
        metavar="HOST:PORT[,HOST:PORT...]",
    )
    max_prompt_tokens: int = option(
        "longest prompt (and negative prompt) accepted, in tokens",
        default=DEFAULT_MAX_PROMPT_TOKENS,
    )
    connect_timeout_s: float = option(
        "seconds to keep retrying the diffusion service when the caller sets no deadline",
        default=DEFAULT_CONNECT_TIMEOUT_S,
    )
    chunk_size: int = option("largest KV chunk in bytes", default=DEFAULT_CHUNK_SIZE)
    max_decode_batch: int = option(
        "text requests (Understand, think plans) decoded together; more wait",
        default=DEFAULT_MAX_BATCH,
    )
    max_decode_tokens: int = option(
        "longest text request: prompt (image tokens included) plus max_new_tokens",
        default=DEFAULT_MAX_TOKENS,
    )
    # The hop's TLS and token: --diffusion-tls-ca, --diffusion-tls-cert, ...
    diffusion_security: ClientSecurity = group(
        ClientSecurity, prefix="diffusion-", peer="the diffusion service"
    )

    def __post_init__(self) -> None:
        """ValueError with one line naming the bad setting."""
        split_addresses(self.diffusion)
        if not 0 < self.chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"--chunk-size must be in 1..{MAX_CHUNK_SIZE}")
        for name in ("max_prompt_tokens", "max_decode_batch", "max_decode_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")

    @property
    def diffusion_addresses(self) -> tuple[str, ...]:
        """`diffusion` split: one address per diffusion service (rank group)."""
        return split_addresses(self.diffusion)

    @property
    def diffusion_token_flag(self) -> str | None:
        """The flag of the hop's token file when one that every user may read is refused
        (None: --allow-insecure-token-file accepts it)."""
        if self.security.allow_insecure_token_file:
            return None
        return "--diffusion-auth-token-file"


def size_pair(text: str) -> tuple[int, int]:
    try:
        longest, shortest = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LONGEST,SHORTEST") from None
    if not 0 < shortest <= longest:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 < SHORTEST <= LONGEST")
    return longest, shortest


@dataclass(frozen=True)
class ModelPrefillSettings(PrefillSettings):
    """BAGEL prefill service: prompt -> KV cache (streamed to the diffusion service) -> events."""

    device: str = option(
        "where the model runs: cpu (fp32) or cuda (bf16)", default="cpu", choices=("cpu", "cuda")
    )
    cuda_allocator: str = cuda_allocator_option()
    image_input: bool = option(
        "text-to-image only: do not load the ViT, the VAE encoder and the gen expert (about half "
        "the memory); requests with an input image get INVALID_ARGUMENT",
        default=True,
    )
    # (longest, shortest); None: the reference's.
    edit_vae_resize: tuple[int, int] | None = option(
        "resize an input image for the VAE to these sides, stride 16 (default: the reference's "
        "1024,512)",
        default=None,
        metavar="LONGEST,SHORTEST",
        parse=size_pair,
    )
    edit_vit_resize: tuple[int, int] | None = option(
        "then for the ViT, stride 14 (default: the reference's 980,224)",
        default=None,
        metavar="LONGEST,SHORTEST",
        parse=size_pair,
    )


def parse_settings(argv: list[str] | None = None) -> ModelPrefillSettings:
    return flags.parse_settings(ModelPrefillSettings, "python -m prefill_service", argv)
