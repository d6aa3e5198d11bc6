"""`python -m diffusion_service --model DIR --listen HOST:PORT [--ulysses U --ring R --cfg-parallel C]`.

Starts its own ranks on this host, or, under `torchrun [--nnodes N] --nproc-per-node G -m
diffusion_service ...` on every node, joins the world torchrun started
(`diffusion_service.torchrun`): global rank 0 serves gRPC, the other ranks follow its commands.
"""

from __future__ import annotations

import logging
import sys

from diffusion_service.ranks import serve_rank, validate_settings
from diffusion_service.server import run
from diffusion_service.settings import parse_settings
from diffusion_service.torchrun import TorchrunWorld
from serving.server import configure_logging

log = logging.getLogger("diffusion_service")


def main() -> None:
    configure_logging()
    settings = parse_settings()
    try:
        if settings.torchrun:
            world = TorchrunWorld.from_env()
            log.info("torchrun: %s", world.describe())
            world.warn_about_restarts()
            if world.rank != 0:  # only global rank 0 serves gRPC (--listen); the rest follow it
                validate_settings(settings)
                serve_rank(settings, world.rank, "env://")
                return
        status = run(settings)
    except ValueError as e:  # an invalid topology or checkpoint: say why and exit
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    main()
