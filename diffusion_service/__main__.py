"""`python -m diffusion_service --model DIR --listen HOST:PORT [--ulysses U --ring R --cfg-parallel C]`.

Starts its own ranks, or, under `torchrun --nproc-per-node N -m diffusion_service ...`, joins the
world torchrun started: rank 0 serves gRPC, the other ranks follow its commands.
"""

from __future__ import annotations

import os
import sys

from diffusion_service.ranks import serve_rank, validate_settings
from diffusion_service.server import run
from diffusion_service.settings import parse_settings
from serving.server import configure_logging


def main() -> None:
    configure_logging()
    settings = parse_settings()
    try:
        if settings.torchrun and int(os.environ["RANK"]) != 0:
            validate_settings(settings)
            serve_rank(settings, int(os.environ["RANK"]), "env://")
            return
        status = run(settings)
    except ValueError as e:  # an invalid topology or checkpoint: say why and exit
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    main()
