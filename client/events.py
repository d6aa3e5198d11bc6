"""`ResultAssembler`: a Generate call's events folded into one `GenerationResult`, the same for
the synchronous and the asyncio client."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from protos import GenerateEvent


class IncompleteGeneration(RuntimeError):
    """The server ended the stream successfully but sent no image (nor latents)."""


@dataclass
class GenerationResult:
    """A finished generation: the decoded image and its PNG, or, for `output_format="latents"`,
    the raw fp32 latents (then `image` is None and `png` empty)."""

    image: Image.Image | None
    png: bytes
    width: int
    height: int
    seed: int
    timings: dict[str, float] = field(default_factory=dict)  # phase name (e.g. "prefill_ms") -> ms
    request_id: str = ""
    steps: int = 0  # Euler steps denoised
    cached_steps: list[int] = field(default_factory=list)  # 0-based steps the step cache served
    latents: np.ndarray | None = None  # final latent tokens [h*w/256, 64], fp32
    prompt_tokens: int = 0  # the conditional context's tokens, from the Usage event (0: none sent)


class ResultAssembler:
    """Feed it every event of one call (`add`), then take the `result`."""

    def __init__(self, request_id: str = "") -> None:
        self.request_id = request_id
        self.timings: dict[str, float] = {}
        self.steps = 0
        self.cached_steps: list[int] = []
        self.prompt_tokens = 0
        self.image: Any = None
        self.latents: Any = None

    def add(self, event: GenerateEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "accepted":
            self.request_id = event.accepted.request_id
        elif kind == "progress":
            self.steps = event.progress.total_steps
            if event.progress.cached:
                self.cached_steps.append(event.progress.step - 1)
        elif kind == "timings":
            self.timings.update((f.name, value) for f, value in event.timings.ListFields())
        elif kind == "usage":
            self.prompt_tokens = event.usage.prompt_tokens
        elif kind == "image":
            self.image = event.image
        elif kind == "latents":
            self.latents = event.latents

    def result(self, params: dict[str, Any]) -> GenerationResult:
        """The finished generation; `params` are the call's keyword arguments (a latents result
        takes its size from them). Raises IncompleteGeneration when no image came."""
        common = {
            "timings": self.timings,
            "request_id": self.request_id,
            "steps": self.steps,
            "cached_steps": self.cached_steps,
            "prompt_tokens": self.prompt_tokens,
        }
        if self.latents is not None:
            latents = self.latents
            array = np.frombuffer(latents.data, dtype="<f4").reshape(tuple(latents.shape))
            height = params.get("height") or 0
            width = params.get("width") or 0
            return GenerationResult(
                None, b"", width, height, latents.seed, latents=array.copy(), **common
            )
        if self.image is None:
            raise IncompleteGeneration(f"request {self.request_id or '?'} ended without an image")
        image = self.image
        decoded = Image.open(io.BytesIO(image.png))
        decoded.load()
        return GenerationResult(decoded, image.png, image.width, image.height, image.seed, **common)
