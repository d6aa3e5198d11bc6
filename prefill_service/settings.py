"""The prefill service's settings, parsed once from the command line (shared by the real service
and `prefill_service.mock`); argparse takes every default from the dataclass."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from prefill_service.prefill import DEFAULT_MAX_PROMPT_TOKENS
from prefill_service.relay import DEFAULT_CONNECT_TIMEOUT_S
from prefill_service.routing import split_addresses
from prefill_service.text import DEFAULT_MAX_BATCH, DEFAULT_MAX_TOKENS
from serving.security import ClientSecurity, SecurityError, ServerSecurity
from serving.settings import (
    DEFAULT_METRICS_HOST,
    DefaultsHelpFormatter,
    add_server_security_arguments,
    default,
    server_security_from_args,
)
from transport import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE


@dataclass(frozen=True)
class PrefillSettings:
    model_dir: str
    listen: str = "127.0.0.1:50051"
    diffusion: str = "127.0.0.1:50052"  # one address, or several comma-separated
    device: str = "cpu"
    metrics_host: str = DEFAULT_METRICS_HOST
    metrics_port: int | None = None
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    drain_s: float = 10.0
    chunk_size: int = DEFAULT_CHUNK_SIZE
    dtype: str | None = None  # mock only: "fp32" or "bf16"; the real service follows the device
    image_input: bool = True  # real only: load the ViT, VAE encoder and gen expert for edits
    edit_vae_resize: tuple[int, int] | None = None  # (longest, shortest); None: the reference's
    edit_vit_resize: tuple[int, int] | None = None
    max_decode_batch: int = DEFAULT_MAX_BATCH  # text requests decoded together
    max_decode_tokens: int = DEFAULT_MAX_TOKENS  # prompt + decoded tokens of one text request
    security: ServerSecurity = field(default_factory=ServerSecurity)  # TLS/mTLS, bearer token
    diffusion_security: ClientSecurity = field(default_factory=ClientSecurity)  # the hop's

    @property
    def diffusion_addresses(self) -> tuple[str, ...]:
        """`diffusion` split: one address per diffusion service (rank group)."""
        return split_addresses(self.diffusion)


def build_parser(prog: str, description: str, *, device: bool = True) -> argparse.ArgumentParser:
    """The service's flags; `device=False` leaves out --device (the mock runs no model)."""
    s = PrefillSettings
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--listen", default=default(s, "listen"), help="HOST:PORT to serve on")
    parser.add_argument(
        "--diffusion",
        default=default(s, "diffusion"),
        metavar="HOST:PORT[,HOST:PORT...]",
        help="the diffusion service; several, comma-separated: each request goes to the serving "
        "one with the fewest of this service's requests in flight",
    )
    if device:
        parser.add_argument(
            "--device",
            choices=("cpu", "cuda"),
            default=default(s, "device"),
            help="where the model runs: cpu (fp32) or cuda (bf16)",
        )
        parser.add_argument(
            "--no-image-input",
            dest="image_input",
            action="store_false",
            help="text-to-image only: do not load the ViT, the VAE encoder and the gen expert "
            "(about half the memory); requests with an input image get INVALID_ARGUMENT",
        )
        parser.add_argument(
            "--edit-vae-resize",
            type=size_pair,
            default=None,
            metavar="LONGEST,SHORTEST",
            help="resize an input image for the VAE to these sides, stride 16 (default: the "
            "reference's 1024,512)",
        )
        parser.add_argument(
            "--edit-vit-resize",
            type=size_pair,
            default=None,
            metavar="LONGEST,SHORTEST",
            help="then for the ViT, stride 14 (default: the reference's 980,224)",
        )
        parser.add_argument(
            "--max-decode-batch",
            type=int,
            default=default(s, "max_decode_batch"),
            help="text requests (Understand, think plans) decoded together; more wait",
        )
        parser.add_argument(
            "--max-decode-tokens",
            type=int,
            default=default(s, "max_decode_tokens"),
            help="longest text request: prompt (image tokens included) plus max_new_tokens",
        )
    parser.add_argument(
        "--metrics-host", default=default(s, "metrics_host"), help="address metrics bind to"
    )
    parser.add_argument("--metrics-port", type=int, default=None, help="Prometheus metrics port")
    parser.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=default(s, "max_prompt_tokens"),
        help="longest prompt (and negative prompt) accepted, in tokens",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=default(s, "connect_timeout_s"),
        help="seconds to keep retrying the diffusion service when the caller sets no deadline",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=default(s, "drain_s"),
        help="seconds to finish work on SIGTERM",
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=default(s, "chunk_size"),
        help="largest KV chunk in bytes",
    )
    add_server_security_arguments(parser)
    c = ClientSecurity
    parser.add_argument(
        "--diffusion-tls-ca",
        default=default(c, "tls_ca"),
        metavar="PEM",
        help="reach the diffusion service over TLS, verifying it with this CA",
    )
    parser.add_argument(
        "--diffusion-tls-cert",
        default=default(c, "tls_cert"),
        metavar="PEM",
        help="client certificate for a diffusion service that requires mTLS",
    )
    parser.add_argument(
        "--diffusion-tls-key",
        default=default(c, "tls_key"),
        metavar="PEM",
        help="private key of --diffusion-tls-cert",
    )
    parser.add_argument(
        "--diffusion-auth-token-file",
        default=default(c, "auth_token_file"),
        metavar="FILE",
        help="bearer token to send to the diffusion service",
    )
    return parser


def size_pair(text: str) -> tuple[int, int]:
    try:
        longest, shortest = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LONGEST,SHORTEST") from None
    if not 0 < shortest <= longest:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 < SHORTEST <= LONGEST")
    return longest, shortest


def settings_from_args(args: argparse.Namespace) -> PrefillSettings:
    try:
        split_addresses(args.diffusion)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if not 0 < args.chunk_size <= MAX_CHUNK_SIZE:
        raise SystemExit(f"--chunk-size must be in 1..{MAX_CHUNK_SIZE}")
    if args.max_prompt_tokens < 1:
        raise SystemExit("--max-prompt-tokens must be positive")
    for flag in ("max_decode_batch", "max_decode_tokens"):
        if getattr(args, flag, 1) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be positive")
    try:
        diffusion_security = ClientSecurity(
            tls_ca=args.diffusion_tls_ca,
            tls_cert=args.diffusion_tls_cert,
            tls_key=args.diffusion_tls_key,
            auth_token_file=args.diffusion_auth_token_file,
            private_token_file=not args.allow_insecure_token_file,
        )
    except SecurityError:
        raise SystemExit("--diffusion-tls-cert and --diffusion-tls-key go together") from None
    return PrefillSettings(
        model_dir=args.model,
        listen=args.listen,
        diffusion=args.diffusion,
        device=getattr(args, "device", default(PrefillSettings, "device")),
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        max_prompt_tokens=args.max_prompt_tokens,
        connect_timeout_s=args.connect_timeout,
        drain_s=args.drain_timeout,
        chunk_size=args.chunk_size,
        dtype=getattr(args, "dtype", None),
        image_input=getattr(args, "image_input", True),
        edit_vae_resize=getattr(args, "edit_vae_resize", None),
        edit_vit_resize=getattr(args, "edit_vit_resize", None),
        max_decode_batch=getattr(args, "max_decode_batch", DEFAULT_MAX_BATCH),
        max_decode_tokens=getattr(args, "max_decode_tokens", DEFAULT_MAX_TOKENS),
        security=server_security_from_args(args),
        diffusion_security=diffusion_security,
    )
