"""One image request, from its validated body to the answer: the prefill calls (n of them, image
i with seed + i, concurrently), the JSON answer, or the server-sent events of a stream. Every
failure becomes an `OpenAIError`; a cancelled task cancels its gRPC calls."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from client import BagelError, GenerationResult, IncompleteGeneration
from client.events import ResultAssembler
from gateway.encoding import b64_off_loop
from gateway.errors import OpenAIError, from_grpc, invalid_request
from gateway.prefill_pool import PrefillPool
from gateway.schema import ImageRequest, schema_values
from protos import GenerateEvent
from serving.params import MAX_SEED

SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")
AUTO_SIZE = (1024, 1024)  # OpenAI's "auto" for generations; an edit's is its input's size
EVENT_PREFIX = {"generation": "image_generation", "edit": "image_edit"}


@dataclass
class Drawing:
    """What one HTTP request asks the prefill service for."""

    kind: str  # "generation" or "edit"
    prompt: str
    params: dict[str, Any]  # `build_request` keyword arguments, seed excluded
    seed: int  # image i uses seed + i
    n: int
    input_image: bytes | None
    output_format: str
    compression: int | None
    stream: bool
    request_id: str

    @property
    def event_prefix(self) -> str:
        return EVENT_PREFIX[self.kind]

    @property
    def think(self) -> bool:
        """Think mode: the model writes a plan first and draws from it."""
        return bool(self.params.get("think"))


def plan(
    body: ImageRequest, kind: str, model_name: str, request_id: str, input_image: bytes | None
) -> Drawing:
    """The drawing `body` asks for, or OpenAIError naming the first bad field."""
    if body.model is not None and body.model != model_name:
        raise OpenAIError(
            404,
            f"the model {body.model!r} does not exist; this gateway serves {model_name!r}",
            "invalid_request_error",
            "model",
            "model_not_found",
        )
    if body.response_format not in (None, "b64_json"):
        raise invalid_request(
            f"response_format {body.response_format!r} is not served: only b64_json is "
            "(images are returned in the answer, never stored behind a URL)",
            "response_format",
        )
    if body.stream and body.n != 1:
        raise invalid_request("a streamed request draws one image: n must be 1", "n")
    params = schema_values(body)
    size = body.size
    if size is not None and size != "auto":
        match = SIZE.fullmatch(size)
        if match is None:
            raise invalid_request(f"size {size!r} is not WIDTHxHEIGHT or auto", "size")
        params["width"], params["height"] = int(match[1]), int(match[2])
    elif kind == "generation":
        params["width"], params["height"] = AUTO_SIZE
    if not body.stream:
        params.pop("partial_images", None)  # previews only travel in a stream
    seed = params.pop("seed", None)
    if seed is None:
        seed = secrets.randbelow(2**31)
    if seed + body.n - 1 > MAX_SEED:
        raise invalid_request(f"seed + n - 1 must be at most {MAX_SEED}", "seed")
    return Drawing(
        kind=kind,
        prompt=body.prompt,
        params=params,
        seed=seed,
        n=body.n,
        input_image=input_image,
        output_format=body.output_format,
        compression=body.output_compression,
        stream=body.stream,
        request_id=request_id,
    )


@dataclass
class OpenStream:
    """A started stream: its SSE bytes, and what holds its gRPC call and its prefill lease, closed
    when the events end, or by `close` if they never ran (the client left before the first byte).
    Closing twice is harmless."""

    events: AsyncIterator[bytes]
    resources: contextlib.AsyncExitStack

    async def close(self) -> None:
        await self.resources.aclose()


class Painter:
    """Runs drawings on the pool; `retry_after_s` goes into 429 answers."""

    def __init__(self, pool: PrefillPool, retry_after_s: int) -> None:
        self.pool = pool
        self.retry_after_s = retry_after_s

    def _failure(self, error: BaseException, request_id: str) -> OpenAIError:
        if isinstance(error, OpenAIError):
            return error
        if isinstance(error, BagelError):
            return from_grpc(error.code(), error.details(), request_id, self.retry_after_s)
        if isinstance(error, TypeError | ValueError):  # a value the request schema refuses
            return invalid_request(str(error))
        if isinstance(error, IncompleteGeneration):
            return from_grpc(grpc.StatusCode.INTERNAL, str(error), request_id, 0)
        raise error

    def _call_args(self, drawing: Drawing, index: int) -> dict[str, Any]:
        request_id = drawing.request_id if drawing.n == 1 else f"{drawing.request_id}-{index}"
        args = {**drawing.params, "seed": drawing.seed + index, "request_id": request_id}
        if drawing.input_image is not None:
            args["input_images"] = [drawing.input_image]
        return args

    async def images(self, drawing: Drawing) -> list[GenerationResult]:
        """All n images, or OpenAIError; the other calls are cancelled when one fails."""

        async def one(index: int) -> GenerationResult:
            async with self.pool.lease() as client:
                return await client.generate(drawing.prompt, **self._call_args(drawing, index))

        tasks = [asyncio.ensure_future(one(i)) for i in range(drawing.n)]
        try:
            return list(await asyncio.gather(*tasks))
        except (BagelError, TypeError, ValueError, IncompleteGeneration) as e:
            raise self._failure(e, drawing.request_id) from None
        finally:
            for task in tasks:
                task.cancel()

    async def open_stream(self, drawing: Drawing) -> OpenStream:
        """The events of a streamed drawing as SSE bytes. The call is started and its first event
        awaited here, so a request the service refuses gets an HTTP error status, not a stream;
        a failure after that is an `error` event."""
        stack = contextlib.AsyncExitStack()
        try:
            client = await stack.enter_async_context(self.pool.lease())
            args = self._call_args(drawing, 0)
            events = client.stream(drawing.prompt, **args)
            stack.callback(events.cancel)
            first = await anext(events, None)
        except BaseException as e:
            await stack.aclose()
            if isinstance(e, BagelError | TypeError | ValueError):
                raise self._failure(e, drawing.request_id) from None
            raise
        return OpenStream(self._sse(drawing, args, first, events, stack), stack)

    async def _sse(
        self,
        drawing: Drawing,
        args: dict[str, Any],
        first: GenerateEvent | None,
        events: AsyncIterator[GenerateEvent],
        stack: contextlib.AsyncExitStack,
    ) -> AsyncIterator[bytes]:
        assembler = ResultAssembler(drawing.request_id)
        try:
            pending = [first] if first is not None else []
            while True:
                event = pending.pop() if pending else await anext(events, None)
                if event is None:
                    break
                assembler.add(event)
                kind = event.WhichOneof("event")
                if kind == "partial_image":
                    yield sse(await self._partial(drawing, event))
                elif kind == "thinking":
                    yield sse(
                        {"type": f"{drawing.event_prefix}.thinking", "delta": event.thinking.text}
                    )
            result = assembler.result(args)
            completed = {
                "type": f"{drawing.event_prefix}.completed",
                **await image_fields(drawing, result.png, result.width, result.height),
                "usage": usage([result], drawing.kind),
                "bagel": reproduction(result, drawing.think),
            }
            yield sse(completed)
        except (BagelError, IncompleteGeneration) as e:
            yield sse(self._failure(e, drawing.request_id).body(), "error")
        finally:
            await stack.aclose()

    @staticmethod
    async def _partial(drawing: Drawing, event: GenerateEvent) -> dict[str, Any]:
        preview = event.partial_image
        return {
            "type": f"{drawing.event_prefix}.partial_image",
            **await image_fields(drawing, preview.png, preview.width, preview.height),
            "partial_image_index": preview.index,
            "bagel": {"step": preview.step},
        }


async def image_fields(drawing: Drawing, png: bytes, width: int, height: int) -> dict[str, Any]:
    """The fields OpenAI's image events share."""
    return {
        "b64_json": await b64_off_loop(png, drawing.output_format, drawing.compression),
        "created_at": int(time.time()),
        "size": f"{width}x{height}",
        "quality": "auto",
        "background": "opaque",
        "output_format": drawing.output_format,
    }


def reproduction(result: GenerationResult, think: bool) -> dict[str, Any]:
    """The extra `bagel` object: what reproduces the image, where its time went and, in think
    mode, the plan it was drawn from."""
    fields = {
        "seed": result.seed,
        "request_id": result.request_id,
        "steps": result.steps,
        "cached_steps": result.cached_steps,
        "timings_ms": result.timings,
    }
    if think:
        fields["thinking"] = result.thinking
    return fields


def usage(results: list[GenerationResult], kind: str) -> dict[str, Any]:
    """OpenAI's usage object: the prompts' tokens as the prefill service counted them, and the
    tokens of think mode's plans as output (no image-token count is reported). Only a
    generation's input is known to be all text; an edit's also counts the input image's tokens,
    which the service does not report apart, so an edit's usage has no `input_tokens_details`."""
    tokens = sum(r.prompt_tokens for r in results)
    planned = sum(r.completion_tokens for r in results)
    counted: dict[str, Any] = {
        "input_tokens": tokens,
        "output_tokens": planned,
        "total_tokens": tokens + planned,
    }
    if kind == "generation":
        counted["input_tokens_details"] = {"text_tokens": tokens, "image_tokens": 0}
    return counted


async def images_response(drawing: Drawing, results: list[GenerationResult]) -> dict[str, Any]:
    """OpenAI's ImagesResponse, each image with its `bagel` object."""
    first = results[0]
    encoded = await asyncio.gather(
        *(b64_off_loop(r.png, drawing.output_format, drawing.compression) for r in results)
    )
    return {
        "created": int(time.time()),
        "data": [
            {"b64_json": b64_json, "bagel": reproduction(r, drawing.think)}
            for b64_json, r in zip(encoded, results, strict=True)
        ],
        "usage": usage(results, drawing.kind),
        "size": f"{first.width}x{first.height}",
        "output_format": drawing.output_format,
        "background": "opaque",
    }


def sse(data: dict[str, Any], event: str | None = None) -> bytes:
    """One server-sent event, named as its `type` says (or `event`)."""
    name = event or data["type"]
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


async def until_disconnect(receive: Callable[[], Any], work: Any) -> Any:
    """Await `work` unless the client goes away first; then `work` is cancelled (and with it its
    gRPC calls) and ClientGone raised. For handlers whose body is already read."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientGone
