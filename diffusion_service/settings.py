"""The diffusion service's settings, parsed once from the command line and shared by every rank."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class ServiceSettings:
    model_dir: str
    listen: str = "127.0.0.1:50052"
    ulysses: int = 1
    ring: int = 1
    cfg_parallel: int = 1
    device: str = "cpu"
    max_queue: int = 8
    max_kv_bytes: int = 1 << 30
    metrics_port: int | None = None
    collective_timeout_s: float = 60.0
    heartbeat_s: float = 2.0
    drain_s: float = 10.0
    torchrun: bool = False  # ranks started by torchrun (env:// rendezvous) instead of by us

    @property
    def world_size(self) -> int:
        return self.ulysses * self.ring * self.cfg_parallel

    @property
    def collective_timeout(self) -> timedelta:
        return timedelta(seconds=self.collective_timeout_s)


def parse_settings(argv: list[str] | None = None) -> ServiceSettings:
    parser = argparse.ArgumentParser(
        prog="python -m diffusion_service",
        description="BAGEL diffusion service: receives a KV cache, denoises on all ranks, streams the image.",
    )
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--listen", default="127.0.0.1:50052", help="HOST:PORT to serve on")
    parser.add_argument(
        "--ulysses", type=int, default=1, help="Ulysses degree (divides the KV heads)"
    )
    parser.add_argument("--ring", type=int, default=1, help="Ring degree")
    parser.add_argument("--cfg-parallel", type=int, default=1, help="CFG-parallel degree")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--max-queue", type=int, default=8, help="requests waiting beyond the running one"
    )
    parser.add_argument(
        "--max-kv-bytes", type=int, default=1 << 30, help="largest KV cache accepted"
    )
    parser.add_argument("--metrics-port", type=int, default=None, help="Prometheus metrics port")
    parser.add_argument("--collective-timeout", type=float, default=60.0, help="seconds")
    parser.add_argument(
        "--drain-timeout", type=float, default=10.0, help="seconds to finish work on SIGTERM"
    )
    args = parser.parse_args(argv)
    return ServiceSettings(
        model_dir=args.model,
        listen=args.listen,
        ulysses=args.ulysses,
        ring=args.ring,
        cfg_parallel=args.cfg_parallel,
        device=args.device,
        max_queue=args.max_queue,
        max_kv_bytes=args.max_kv_bytes,
        metrics_port=args.metrics_port,
        collective_timeout_s=args.collective_timeout,
        drain_s=args.drain_timeout,
        torchrun=started_by_torchrun(),
    )


def started_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or (
        "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
    )
