"""`POST /v1/chat/completions`: OpenAI's chat body -> a prefill service's Understand call -> a
`chat.completion`, or with `stream: true` its `chat.completion.chunk` events. Text parts and
`image_url` parts given as data URLs (PNG or JPEG); `think` (an extra field) asks for reasoning
in `<think>...</think>`; the text-sampling schema's fields (`top_k`, `do_sample`, ...) ride as
extra fields too, derived from `serving.text_params.TextSampling`."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import grpc
from pydantic import BaseModel, ConfigDict, Field, create_model

from client import BagelError
from client.text import SAMPLING_NAMES
from gateway.drawing import OpenStream
from gateway.errors import OpenAIError, from_grpc, invalid_request
from gateway.prefill_pool import PrefillPool
from protos import UnderstandEvent
from serving.text_params import TextSampling

DATA_URL = "data:"
# Schema fields that OpenAI's own names stand for (max_tokens / max_completion_tokens give
# max_new_tokens; temperature, top_p and seed are the same fields).
COVERED_BY_OPENAI = frozenset({"max_new_tokens", "temperature", "top_p", "seed"})


class ImageURL(BaseModel):
    url: str = Field(description="a data URL: data:image/png;base64,... (or image/jpeg)")
    detail: str | None = Field(None, description="accepted and ignored")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = Field(None, description="accepted and ignored")


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """OpenAI's chat completion fields that apply to BAGEL."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = Field(None, description="the served model's id (see /v1/models)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, description="most tokens to decode")
    max_completion_tokens: int | None = Field(None, description="same as max_tokens")
    temperature: float | None = Field(
        None, description="> 0: sample at this temperature; 0 or unset: greedy (BAGEL's default)"
    )
    top_p: float | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="one answer per request")
    user: str | None = Field(None, description="accepted and ignored")
    think: bool = Field(False, description="reason in <think>...</think> before answering")


def _extra(name: str) -> tuple[Any, Any]:
    f = TextSampling.__dataclass_fields__[name]
    return f.metadata["codec"].json_type() | None, Field(None, description=f.metadata["help"])


ChatCompletionRequest = create_model(
    "ChatCompletionRequest",
    __base__=ChatRequest,
    __doc__=f"{ChatRequest.__doc__} Plus the text-sampling schema's other fields.",
    **{name: _extra(name) for name in SAMPLING_NAMES - COVERED_BY_OPENAI},
)


def image_bytes(url: str, param: str) -> bytes:
    if not url.startswith(DATA_URL):
        raise invalid_request(
            f"{param} must be a data URL (data:image/png;base64,...); remote URLs are not fetched",
            param,
        )
    header, _, payload = url[len(DATA_URL) :].partition(",")
    if not header.endswith(";base64"):
        raise invalid_request(f"{param} must be base64 encoded (data:...;base64,...)", param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise invalid_request(f"{param} is not valid base64", param) from None


def conversation(body: ChatRequest) -> list[tuple[str, Any]]:
    """The messages as `client.text.understand_request` takes them."""
    messages = []
    for m, message in enumerate(body.messages):
        role = "system" if message.role == "developer" else message.role
        if isinstance(message.content, str):
            messages.append((role, message.content))
            continue
        parts: list[Any] = []
        for p, part in enumerate(message.content):
            param = f"messages.{m}.content.{p}"
            if part.type == "text":
                if part.text is None:
                    raise invalid_request(f"{param}.text is required", f"{param}.text")
                parts.append(part.text)
            else:
                if part.image_url is None:
                    raise invalid_request(f"{param}.image_url is required", f"{param}.image_url")
                parts.append(image_bytes(part.image_url.url, f"{param}.image_url.url"))
        messages.append((role, parts))
    return messages


def call_params(body: ChatRequest, request_id: str) -> dict[str, Any]:
    """The Understand call's keyword arguments: OpenAI's names mapped onto the schema's."""
    params: dict[str, Any] = {"think": body.think, "request_id": request_id}
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise invalid_request("send max_tokens or max_completion_tokens, not both", "max_tokens")
    limit = (
        body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    )
    if limit is not None:
        params["max_new_tokens"] = limit
    if body.temperature is not None and body.temperature > 0:
        params["do_sample"] = True
        params["temperature"] = body.temperature
    params["top_p"], params["seed"] = body.top_p, body.seed
    for name in SAMPLING_NAMES - COVERED_BY_OPENAI:
        value = getattr(body, name)
        if value is not None:
            params[name] = value
    return params


class ChatAnswerer:
    """Runs chat requests on the pool; `retry_after_s` goes into 429 answers."""

    def __init__(self, pool: PrefillPool, model_name: str, retry_after_s: int) -> None:
        self.pool = pool
        self.model_name = model_name
        self.retry_after_s = retry_after_s

    def check_model(self, body: ChatRequest) -> None:
        if body.model is not None and body.model != self.model_name:
            raise OpenAIError(
                404,
                f"the model {body.model!r} does not exist; this gateway serves {self.model_name!r}",
                "invalid_request_error",
                "model",
                "model_not_found",
            )

    async def open(
        self, body: ChatRequest, request_id: str
    ) -> tuple[AsyncIterator[UnderstandEvent], contextlib.AsyncExitStack]:
        """The call, started and its first event awaited: a refused request raises OpenAIError
        (an HTTP error status), never a stream that fails at once."""
        self.check_model(body)
        messages = conversation(body)
        params = call_params(body, request_id)
        stack = contextlib.AsyncExitStack()
        try:
            client = await stack.enter_async_context(self.pool.lease())
            events = client.understand_stream(messages, **params)
            stack.callback(events.cancel)
            first = await anext(events, None)
        except BaseException as e:
            await stack.aclose()
            raise self._failure(e, request_id) from None
        return _prepend(first, events), stack

    def _failure(self, error: BaseException, request_id: str) -> BaseException:
        if isinstance(error, BagelError):
            return from_grpc(error.code(), error.details(), request_id, self.retry_after_s)
        if isinstance(error, TypeError | ValueError):  # a value the schema refuses
            return invalid_request(str(error))
        return error

    async def completion(self, body: ChatRequest, request_id: str) -> dict[str, Any]:
        events, stack = await self.open(body, request_id)
        chunks: list[str] = []
        finished = None
        try:
            async for event in events:
                kind = event.WhichOneof("event")
                if kind == "delta":
                    chunks.append(event.delta.text)
                elif kind == "finished":
                    finished = event.finished
        except BagelError as e:
            raise self._failure(e, request_id) from None
        finally:
            await stack.aclose()
        if finished is None:
            raise from_grpc(grpc.StatusCode.INTERNAL, "no final event", request_id, 0)
        return {
            "id": completion_id(request_id),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(chunks)},
                    "finish_reason": finished.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": usage(finished),
            "bagel": timings(finished),
        }

    async def stream(self, body: ChatRequest, request_id: str) -> OpenStream:
        """The chunk events (`data: {...}`), then `data: [DONE]`; a failure after the first
        event is an `error` object in the stream."""
        events, stack = await self.open(body, request_id)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return OpenStream(self._chunks(events, stack, request_id, include_usage), stack)

    async def _chunks(
        self,
        events: AsyncIterator[UnderstandEvent],
        stack: contextlib.AsyncExitStack,
        request_id: str,
        include_usage: bool,
    ) -> AsyncIterator[bytes]:
        base = {
            "id": completion_id(request_id),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.model_name,
        }

        def chunk(delta: dict, finish: str | None = None, **extra: Any) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return data({**base, "choices": [choice], **extra})

        try:
            yield chunk({"role": "assistant", "content": ""})
            async for event in events:
                kind = event.WhichOneof("event")
                if kind == "delta":
                    yield chunk({"content": event.delta.text})
                elif kind == "finished":
                    yield chunk({}, event.finished.finish_reason)
                    if include_usage:
                        yield data({**base, "choices": [], "usage": usage(event.finished)})
            yield b"data: [DONE]\n\n"
        except BagelError as e:
            failure = self._failure(e, request_id)
            body = failure.body() if isinstance(failure, OpenAIError) else {"error": str(e)}
            yield data(body)
        finally:
            await stack.aclose()


async def _prepend(
    first: UnderstandEvent | None, rest: AsyncIterator[UnderstandEvent]
) -> AsyncIterator[UnderstandEvent]:
    if first is not None:
        yield first
    async for event in rest:
        yield event


def completion_id(request_id: str) -> str:
    return f"chatcmpl-{request_id}"


def usage(finished: Any) -> dict[str, int]:
    prompt, completion = finished.usage.prompt_tokens, finished.usage.completion_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def timings(finished: Any) -> dict[str, Any]:
    return {
        "timings_ms": {
            "prefill_ms": finished.prefill_ms,
            "decode_ms": finished.decode_ms,
            "total_ms": finished.total_ms,
        }
    }


def data(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()
