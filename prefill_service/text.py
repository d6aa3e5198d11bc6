"""The prefill service's text side: Understand (image understanding and chat) and the plan of a
think request, both decoded by one `DecodeScheduler` that batches every request in flight.

A request is checked whole before it queues (roles, parts, images, sampling values, its tokens
against the decoder's room); its prompt is built on the decode thread. Text goes out as deltas
that concatenate to the answer; the end token itself is never sent.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from PIL import Image

from bagel.prompting.contexts import (
    EditImage,
    Segment,
    SegmentKind,
    mixed_sequence,
    next_rope_position,
    num_tokens,
    prepare_edit_image,
)
from bagel.prompting.conversation import Part, plan_segments, understanding_segments
from bagel.text.decoding import Sampling, TextDecoder
from bagel.text.detokenizer import Detokenizer
from bagel.text.tokenizer import PROMPT_END_TOKEN
from prefill_service.decode_scheduler import DecodeJob, DecodeScheduler, Prefilled
from prefill_service.model_turns import ModelTurns
from prefill_service.prefill import MAX_PROMPT_CHARS, NO_IMAGE_INPUT, check_prompt_text
from protos import Accepted, TextDelta, TextFinished, UnderstandEvent, UnderstandRequest, Usage
from serving.errors import InvalidParams, ServiceError
from serving.imaging.input_images import decode_input_image
from serving.text_params import TextSampling

ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 64
MAX_IMAGES = 1  # one ViT segment per request, as an edit's
DEFAULT_MAX_BATCH = 32
DEFAULT_MAX_TOKENS = 8192  # prompt and decoded tokens of one request (a 980² image is ~4900)
NO_TEXT = "this prefill service does not decode text (its KV source has no language model head)"


@dataclass
class TextRequest:
    """A checked request: its segments (ViT image included) and how to decode."""

    segments: list[Segment]
    image: EditImage | None
    sampling: Sampling

    @property
    def prompt_tokens(self) -> int:
        return num_tokens(self.segments)


@dataclass(frozen=True)
class Queued:
    """The first item `TextSide.decode` yields: requests ahead of this one in the queue."""

    position: int


@dataclass
class Answer:
    """What a finished decode reports."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    prefill_s: float
    decode_s: float


class TextSide:
    """Holds the scheduler of one loaded source (built on first use); thread-safe to create.
    `turns`: shared with the model's other users (`prefill_service.model_turns`)."""

    def __init__(
        self,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        turns: ModelTurns | None = None,
    ) -> None:
        self.max_batch = max_batch
        self.max_tokens = max_tokens
        self.turns = turns or ModelTurns()
        self._scheduler: DecodeScheduler | None = None
        self._source: object | None = None
        self._lock = threading.Lock()

    @staticmethod
    def can_decode(source) -> bool:
        """Whether `source`'s model decodes text (it was loaded with its LM head)."""
        model = getattr(source, "model", None)
        return model is not None and bool(getattr(model, "with_lm_head", False))

    def scheduler(self, source) -> DecodeScheduler:
        """The scheduler over `source`'s model; ServiceError if the source cannot decode."""
        if not self.can_decode(source):
            raise ServiceError(grpc.StatusCode.UNIMPLEMENTED, NO_TEXT)
        model = source.model
        with self._lock:
            if self._scheduler is None or self._source is not source:
                if self._scheduler is not None:
                    self._scheduler.close()
                decoder = TextDecoder(model, self.max_batch, self.max_tokens)
                self._scheduler = DecodeScheduler(decoder, self.turns)
                self._source = source
            return self._scheduler

    def close(self) -> None:
        if self._scheduler is not None:
            self._scheduler.close()

    # ---- checks, before any compute ------------------------------------------------------

    def understanding_request(self, source, request: UnderstandRequest) -> TextRequest:
        """Raise InvalidParams naming the fault (runs on a worker thread: images decode here)."""
        self.scheduler(source)  # a source that cannot decode says so first
        if not request.messages:
            raise InvalidParams("messages is empty: send at least one message")
        if len(request.messages) > MAX_MESSAGES:
            raise InvalidParams(f"{len(request.messages)} messages; at most {MAX_MESSAGES}")
        parts: list[Part] = []
        image: EditImage | None = None
        for m, message in enumerate(request.messages):
            if message.role not in ROLES:
                raise InvalidParams(
                    f"messages[{m}].role={message.role!r} must be one of {', '.join(ROLES)}"
                )
            if not message.content:
                raise InvalidParams(f"messages[{m}].content is empty")
            for p, part in enumerate(message.content):
                name = f"messages[{m}].content[{p}]"
                kind = part.WhichOneof("part")
                if kind == "text":
                    if not part.text.strip():
                        raise InvalidParams(f"{name}.text is empty")
                    if len(part.text) > MAX_PROMPT_CHARS:
                        raise InvalidParams(
                            f"{name}.text is longer than {MAX_PROMPT_CHARS} characters"
                        )
                    parts.append(part.text)
                elif kind == "image":
                    if image is not None:
                        raise InvalidParams(f"{name}: at most {MAX_IMAGES} image per request")
                    image = self._image(source, decode_input_image(part.image, f"{name}.image"))
                    parts.append(image.segments(source.config)[1:])  # the ViT's only
                else:
                    raise InvalidParams(f"{name} has neither text nor an image")
        sampling = self.sampling(request.sampling)
        with source._tokenizer_lock:
            segments = understanding_segments(source.tokenizer, parts, request.think)
        text_request = TextRequest(segments, image, sampling)
        self.check_fits(source, text_request, "the conversation")
        return text_request

    def plan_request(
        self, source, prompt: str, sampling_msg, image: Image.Image | None
    ) -> TextRequest:
        """A think request's plan: the prompt (and the edit's image) under the system prompt."""
        self.scheduler(source)
        check_prompt_text(prompt)
        sampling = self.sampling(sampling_msg)
        edit_image = None
        image_segments: list[Segment] = []
        if image is not None:
            edit_image = self._image(source, image, edit=True)
            image_segments = edit_image.segments(source.config)
        with source._tokenizer_lock:
            segments = plan_segments(source.tokenizer, prompt, image_segments)
        text_request = TextRequest(segments, edit_image, sampling)
        self.check_fits(source, text_request, "the prompt")
        return text_request

    @staticmethod
    def sampling(msg) -> Sampling:
        settings = TextSampling.from_proto(msg)
        settings.validate()
        return Sampling(**settings.as_dict())

    def check_fits(self, source, request: TextRequest, what: str) -> None:
        limit = min(self.max_tokens, source.config.llm.max_position_embeddings)
        total = request.prompt_tokens + request.sampling.max_new_tokens
        if total > limit:
            raise InvalidParams(
                f"{what} is {request.prompt_tokens} tokens and max_new_tokens is "
                f"{request.sampling.max_new_tokens}: {total} tokens, more than the {limit} "
                "this service decodes per request"
            )

    @staticmethod
    def _image(source, image: Image.Image, edit: bool = False) -> EditImage:
        if getattr(source, "contexts", None) is None or source.edit_resize is None:
            raise InvalidParams(NO_IMAGE_INPUT)
        if edit and not source.model.with_gen:
            raise InvalidParams(NO_IMAGE_INPUT)
        return prepare_edit_image(image, source.edit_resize)

    # ---- decoding ------------------------------------------------------------------------

    def job(self, source, request: TextRequest) -> DecodeJob:
        def build():
            images = {}
            kinds = {s.kind for s in request.segments}
            if SegmentKind.VAE_IMAGE in kinds:
                images = source.contexts.image_embeddings(request.image)
            elif SegmentKind.VIT_IMAGE in kinds:
                images = source.contexts.vit_embeddings(request.image)
            prompt = mixed_sequence(source.model, request.segments, images)
            return prompt, next_rope_position(request.segments)

        end = source.tokenizer.special_ids[PROMPT_END_TOKEN]
        return DecodeJob(build, request.sampling, end)

    async def decode(self, source, request: TextRequest) -> AsyncIterator[Queued | str | Answer]:
        """`Queued`, then text deltas as they are decoded, then the `Answer`. Leaving early (or
        cancelling the task) takes the request out of the batch before the next step."""
        scheduler = self.scheduler(source)
        stream = scheduler.submit(self.job(source, request))
        yield Queued(stream.queue_position)
        detokenizer = Detokenizer(source.tokenizer)
        prefilled = Prefilled(0, 0.0)
        decoded = 0
        started = time.perf_counter()
        try:
            async for item in stream:
                if isinstance(item, Prefilled):
                    prefilled = item
                    started = time.perf_counter()
                    continue
                decoded += 1
                if item.finish == "stop":
                    delta = detokenizer.flush()
                else:
                    delta = detokenizer.add(item.token)
                    if item.finish is not None:
                        delta += detokenizer.flush()
                if delta:
                    yield delta
                if item.finish is not None:
                    yield Answer(
                        text=source.tokenizer.decode(detokenizer.tokens),
                        finish_reason=item.finish,
                        prompt_tokens=prefilled.prompt_tokens,
                        completion_tokens=decoded,
                        prefill_s=prefilled.prefill_s,
                        decode_s=time.perf_counter() - started,
                    )
        finally:
            stream.cancel()


async def understand_events(
    text: TextSide, source, request: UnderstandRequest, request_id: str
) -> AsyncIterator[UnderstandEvent]:
    """The events of one Understand call: Accepted, deltas, TextFinished."""
    started = time.perf_counter()
    loop = asyncio.get_running_loop()
    checked = await loop.run_in_executor(None, text.understanding_request, source, request)
    async for item in text.decode(source, checked):
        if isinstance(item, Queued):
            yield UnderstandEvent(
                accepted=Accepted(request_id=request_id, queue_position=item.position)
            )
            continue
        if isinstance(item, str):
            yield UnderstandEvent(delta=TextDelta(text=item))
            continue
        yield UnderstandEvent(
            finished=TextFinished(
                finish_reason=item.finish_reason,
                usage=Usage(
                    prompt_tokens=item.prompt_tokens, completion_tokens=item.completion_tokens
                ),
                prefill_ms=item.prefill_s * 1000,
                decode_ms=item.decode_s * 1000,
                total_ms=(time.perf_counter() - started) * 1000,
            )
        )
