"""`python -m diffusion_service --model DIR --listen HOST:PORT [--ulysses U --ring R --cfg-parallel C]`.

Starts its own ranks on this host, or, under `torchrun [--nnodes N] --nproc-per-node G -m
diffusion_service ...` on every node, joins the world torchrun started
(`diffusion_service.launch`): global rank 0 serves gRPC, the other ranks follow its commands.
"""

from __future__ import annotations

import logging
import sys

from bagel.checkpoints.check_checkpoint import model_dir_fault
from bagel.devices import device_fault
from diffusion_service.launch import TorchrunWorld, serve_torchrun_rank
from diffusion_service.server import run
from diffusion_service.settings import ServiceSettings, parse_settings
from serving.service.cuda_allocator import configure_cuda_allocator
from serving.service.server import configure_logging
from serving.service.startup import StartupError, check_port_free, exit_on_misconfiguration, require

log = logging.getLogger("diffusion_service")


def check_startup(settings: ServiceSettings, serves_grpc: bool) -> None:
    """Refuse a misconfiguration in one line (exit 2) before any rank or model loads."""
    with exit_on_misconfiguration():
        if serves_grpc:
            check_port_free(settings.listen)
        gpus = 1 if settings.torchrun else settings.world_size  # torchrun: one GPU per process
        require(device_fault(settings.device, gpus))
        require(model_dir_fault(settings.model_dir))


def main() -> None:
    configure_logging()
    settings = parse_settings()
    check_startup(settings, serves_grpc=not settings.torchrun or TorchrunWorld.from_env().rank == 0)
    if settings.device == "cuda":  # before the first CUDA allocation; our own ranks fork later
        configure_cuda_allocator(settings.cuda_allocator)
    try:
        if settings.torchrun:
            world = TorchrunWorld.from_env()
            log.info("torchrun: %s", world.describe())
            world.warn_about_restarts()
            if world.rank != 0:  # only global rank 0 serves gRPC (--listen); the rest follow it
                serve_torchrun_rank(settings, world)
                return
        status = run(settings)
    except (ValueError, StartupError) as e:  # an invalid topology or checkpoint, a taken port
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    main()
