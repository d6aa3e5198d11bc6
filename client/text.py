"""The text side of the client: an `UnderstandRequest` from a conversation and keyword arguments
(the sampling settings of `serving.text_params.TextSampling`, `think`, `request_id`), and the
collected answer of an Understand call."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from client.request import ImageInput, image_bytes
from protos import ChatMessage, ContentPart, UnderstandEvent, UnderstandRequest
from serving.text_params import sampling_message, sampling_names

SAMPLING_NAMES = sampling_names()
TEXT_PARAM_NAMES = frozenset((*SAMPLING_NAMES, "think", "request_id"))

# A message's content: text, an image (bytes, a path or a PIL image), or a list of both.
Content = str | ImageInput | Sequence[str | ImageInput]
Message = tuple[str, Content]  # (role, content): role "system", "user" or "assistant"


@dataclass
class TextResult:
    """A finished answer: its text, why it stopped ("stop" or "length"), the tokens used and the
    server's timings (prefill_ms, decode_ms, total_ms)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, float] = field(default_factory=dict)
    request_id: str = ""


class IncompleteAnswer(RuntimeError):
    """The server ended the stream successfully but sent no final event."""


def _parts(content: Content) -> list[ContentPart]:
    single = isinstance(content, str | bytes) or not isinstance(content, Sequence)
    items = [content] if single else content
    parts = []
    for item in items:
        if isinstance(item, str):
            parts.append(ContentPart(text=item))
        else:
            parts.append(ContentPart(image=image_bytes(item)))
    return parts


def understand_request(messages: Iterable[Message], **params: Any) -> UnderstandRequest:
    """A request for `messages` (oldest first); `params` are the names in `TEXT_PARAM_NAMES`,
    None leaving a field unset. Unknown names and values of the wrong type raise TypeError."""
    unknown = sorted(set(params) - TEXT_PARAM_NAMES)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")
    request = UnderstandRequest(
        messages=[ChatMessage(role=role, content=_parts(content)) for role, content in messages]
    )
    sampling = {n: params[n] for n in SAMPLING_NAMES if params.get(n) is not None}
    request.sampling.CopyFrom(sampling_message(**sampling))
    think = params.get("think")
    if think is not None:
        if not isinstance(think, bool):
            raise TypeError(f"think must be a bool, got {think!r}")
        request.think = think
    request_id = params.get("request_id")
    if request_id is not None:
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str, got {request_id!r}")
        request.request_id = request_id
    return request


def collect_answer(
    events: Iterable[UnderstandEvent], on_text: Callable[[str], None] | None = None
) -> TextResult:
    """Read an Understand call to its end; `on_text` sees each delta as it arrives."""
    request_id, chunks = "", []
    result = None
    for event in events:  # to the end, so a status after the final event still raises
        kind = event.WhichOneof("event")
        if kind == "accepted":
            request_id = event.accepted.request_id
        elif kind == "delta":
            chunks.append(event.delta.text)
            if on_text is not None:
                on_text(event.delta.text)
        elif kind == "finished":
            done = event.finished
            result = TextResult(
                text="".join(chunks),
                finish_reason=done.finish_reason,
                prompt_tokens=done.usage.prompt_tokens,
                completion_tokens=done.usage.completion_tokens,
                timings={
                    "prefill_ms": done.prefill_ms,
                    "decode_ms": done.decode_ms,
                    "total_ms": done.total_ms,
                },
                request_id=request_id,
            )
    if result is not None:
        return result
    raise IncompleteAnswer(f"request {request_id or '?'} ended without a final event")
