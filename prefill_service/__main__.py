"""`python -m prefill_service --model DIR --listen HOST:PORT --diffusion HOST:PORT --device cpu|cuda
[--metrics-port P]`: the prefill service with BAGEL's language model."""

from __future__ import annotations

import asyncio
import sys

from prefill_service.prefill import LanguageModelKV
from prefill_service.server import serve
from prefill_service.settings import build_parser, settings_from_args
from serving.server import configure_logging


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(
        "python -m prefill_service",
        "BAGEL prefill service: prompt -> KV cache (streamed to the diffusion service) -> events.",
    )
    settings = settings_from_args(parser.parse_args(argv))
    configure_logging()

    def load() -> LanguageModelKV:
        return LanguageModelKV(settings.model_dir, settings.device)

    return asyncio.run(serve(settings, load))


if __name__ == "__main__":
    sys.exit(main())
