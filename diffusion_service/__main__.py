"""`python -m diffusion_service --model DIR --listen HOST:PORT [--ulysses U --ring R --cfg-parallel C]`."""

from __future__ import annotations

import logging
import sys

from diffusion_service.server import run
from diffusion_service.settings import parse_settings


def main() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    settings = parse_settings()
    try:
        run(settings)
    except ValueError as e:  # an invalid topology or checkpoint: say why and exit
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
