"""`python -m prefill_service --model DIR --listen HOST:PORT --diffusion HOST:PORT --device cpu|cuda
[--metrics-port P]`: the prefill service with BAGEL's language model."""

from __future__ import annotations

import asyncio
import sys

from bagel.checkpoints.check_checkpoint import model_dir_fault
from bagel.devices import device_fault
from bagel.prompting.contexts import EditResize
from bagel.prompting.image_transforms import ResizeRule
from prefill_service.prefill import LanguageModelKV
from prefill_service.server import serve
from prefill_service.settings import ModelPrefillSettings, parse_settings
from serving.service.cuda_allocator import configure_cuda_allocator
from serving.service.server import configure_logging
from serving.service.startup import check_port_free, exit_on_misconfiguration, require


def edit_resize(settings: ModelPrefillSettings) -> EditResize | None:
    """The input-image resize rules the flags ask for (None: the reference's)."""
    vae, vit = settings.edit_vae_resize, settings.edit_vit_resize
    if vae is None and vit is None:
        return None
    return EditResize(
        vae=ResizeRule(*(vae or (1024, 512)), stride=16),
        vit=ResizeRule(*(vit or (980, 224)), stride=14),
    )


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    with exit_on_misconfiguration():  # one line and exit status 2, before the model loads
        check_port_free(settings.listen)
        require(device_fault(settings.device))
        require(model_dir_fault(settings.model_dir))
    configure_logging()
    if settings.device == "cuda":  # before the first CUDA allocation
        configure_cuda_allocator(settings.cuda_allocator)

    def load() -> LanguageModelKV:
        return LanguageModelKV(
            settings.model_dir,
            settings.device,
            image_input=settings.image_input,
            edit_resize=edit_resize(settings),
        )

    with exit_on_misconfiguration():  # e.g. an address gRPC cannot bind
        return asyncio.run(serve(settings, load))


if __name__ == "__main__":
    sys.exit(main())
