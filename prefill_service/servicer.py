"""The `bagel.v1.Prefill` servicer: validates a request before any compute, hands it to
`prefill.request_frames` and `relay.relay` (to the group `routing` picks; the frames are computed
on the service's `kv_worker`), and maps failures to a status through `serving.errors.status_of` (the one place that does). Its handler decodes requests
itself, so bytes that are no `GenerateRequest` end as INVALID_ARGUMENT with one log line."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from PIL import Image

from bagel.network.kv import Branch
from prefill_service.kv_worker import KVWorker
from prefill_service.metrics import PrefillMetrics
from prefill_service.prefill import (
    DEFAULT_MAX_PROMPT_TOKENS,
    NO_IMAGE_INPUT,
    EditKVSource,
    KVSource,
    PrefillStats,
    check_token_counts,
    prompt_tokens,
    request_frames,
    token_limit,
)
from prefill_service.relay import SendStats, relay
from prefill_service.routing import DiffusionRouter
from prefill_service.text import Answer, Queued, TextSide, understand_events
from protos import (
    PREFILL_SERVICE,
    GenerateEvent,
    GenerateRequest,
    TextDelta,
    UnderstandEvent,
    UnderstandRequest,
    Usage,
    service_pb2_grpc,
)
from serving.errors import InvalidParams, ServiceError, status_of
from serving.imaging.input_images import EDIT_DEFAULTS, decode_input_images
from serving.params import GenerationParams, RequestLimits, validate
from serving.service.requests import (
    MAX_REQUEST_ID_CHARS,
    check_request_id,
    loggable,
    new_request_id,
)
from transport import DEFAULT_CHUNK_SIZE

log = logging.getLogger(__name__)
LOGGED_MESSAGE_CHARS = 300  # a status message may quote what the client sent
DEADLINE_SLACK_S = 0.05


class UndecodableRequest:
    """What the handler gets instead of a request whose bytes protobuf cannot decode."""

    def __init__(self, size: int, error: DecodeError) -> None:
        self.size = size
        self.error = error


def logged_status(
    log: logging.Logger | logging.LoggerAdapter, what: str, error: Exception
) -> tuple[grpc.StatusCode, str]:
    """`error`'s status and message (`status_of`), logged as `what`: an INTERNAL one as an
    error with its traceback, the others (the caller's faults, an unavailable peer) as
    warnings."""
    code, message = status_of(error)
    level = logging.ERROR if code is grpc.StatusCode.INTERNAL else logging.WARNING
    log.log(
        level,
        "%s: %s: %s",
        what,
        code.name,
        loggable(message, LOGGED_MESSAGE_CHARS),
        exc_info=level >= logging.ERROR,
    )
    return code, message


def decode_request(data: bytes, kind: type = GenerateRequest) -> object:
    """The request deserializer: a decode failure is the caller's fault, so it reaches the
    handler as a value instead of as gRPC's own traceback and UNKNOWN status."""
    try:
        return kind.FromString(data)
    except DecodeError as e:
        return UndecodableRequest(len(data), e)


def prefill_handler(servicer: PrefillServicer) -> grpc.GenericRpcHandler:
    """`bagel.v1.Prefill` with `decode_request` as the request deserializer."""
    method = grpc.unary_stream_rpc_method_handler(
        servicer.Generate,
        request_deserializer=decode_request,
        response_serializer=GenerateEvent.SerializeToString,
    )
    understand = grpc.unary_stream_rpc_method_handler(
        servicer.Understand,
        request_deserializer=lambda data: decode_request(data, UnderstandRequest),
        response_serializer=UnderstandEvent.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(
        PREFILL_SERVICE, {"Generate": method, "Understand": understand}
    )


@dataclass(frozen=True)
class CheckedRequest:
    """A Generate request past `PrefillServicer._check`: the source that serves it, its validated
    parameters and its decoded input images."""

    source: KVSource
    params: GenerationParams
    images: list[Image.Image]


class RequestLog(logging.LoggerAdapter):
    """Prefixes every message with the request id."""

    def process(self, msg, kwargs):
        return f"[{self.extra['request_id']}] {msg}", kwargs


class PrefillServicer(service_pb2_grpc.PrefillServicer):
    """`source` is None until the model is loaded; requests meanwhile get UNAVAILABLE. `worker`
    computes every request's KV."""

    def __init__(
        self,
        router: DiffusionRouter,
        metrics: PrefillMetrics,
        *,
        worker: KVWorker,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
        text: TextSide | None = None,
    ) -> None:
        self.source: KVSource | None = None
        self.text = text or TextSide()
        self.max_prompt_tokens = max_prompt_tokens
        self.router = router
        self.worker = worker
        self.metrics = metrics
        self.chunk_size = chunk_size

    async def Generate(
        self, request: GenerateRequest | UndecodableRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[GenerateEvent]:
        raw_id = "" if isinstance(request, UndecodableRequest) else request.request_id
        request_id = raw_id or new_request_id()
        request_log = RequestLog(log, {"request_id": loggable(request_id, MAX_REQUEST_ID_CHARS)})
        started = time.perf_counter()
        prefill, sent = PrefillStats(), SendStats()
        code: grpc.StatusCode | None = None  # None until the call has ended one way or another
        recorded = False
        self.metrics.in_flight.inc()
        try:
            if isinstance(request, UndecodableRequest):
                raise InvalidParams(
                    f"the request ({request.size} bytes) is not a valid GenerateRequest: "
                    f"{request.error}"
                )
            checked = await self._check(request, request_id)
            plan: Answer | None = None
            if request.think:
                async for item in self._think(request, checked):
                    if isinstance(item, str):
                        yield GenerateEvent(thinking=TextDelta(text=item))
                    else:
                        plan = item
            batches, usage = await self._prepare(
                request, checked, request_id, prefill, request_log, plan and plan.text
            )
            if plan is not None:
                usage.usage.completion_tokens = plan.completion_tokens
            with await self.router.lease(context.time_remaining()) as lease:
                if len(self.router.groups) > 1:
                    request_log.info("to the diffusion service at %s", lease.link.address)
                async for event in relay(
                    lease.link,
                    batches,
                    worker=self.worker,
                    time_remaining=context.time_remaining,
                    prefill=prefill,
                    sent=sent,
                    started=started,
                ):
                    yield event
                    if event.WhichOneof("event") == "accepted":
                        yield usage
            code = grpc.StatusCode.OK
        except (asyncio.CancelledError, GeneratorExit):
            # The caller went away (cancel, disconnect) or its deadline passed: gRPC cancels the
            # handler or closes this generator at a `yield`.
            code = self._ended_by_caller(context)
            request_log.info("ended by the caller: %s", code.name)
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes a status, in one place
            code, message = logged_status(request_log, "failed", e)
            # Counted before the status leaves: a caller that reads the metrics once it has
            # the status must find this call in them.
            self._record(code, started, prefill, sent)
            recorded = True
            await context.abort(code, message)
        finally:
            if code is None:  # left some other way: only the caller can have ended it
                code = self._ended_by_caller(context)
                request_log.info("ended by the caller: %s", code.name)
            if not recorded:
                self._record(code, started, prefill, sent)
            if code is grpc.StatusCode.OK:
                request_log.info(
                    "done in %.3f s: prefill %.1f ms, %d KV bytes sent in %.1f ms",
                    time.perf_counter() - started,
                    prefill.compute_s * 1000,
                    sent.bytes_sent,
                    (sent.send_s or 0.0) * 1000,
                )

    @staticmethod
    def _ended_by_caller(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
        """DEADLINE_EXCEEDED if the caller's deadline has (all but) passed, else CANCELLED. The
        caller's own timer fires a little before ours (the deadline travels rounded up), so its
        cancel can arrive with a few milliseconds still left here."""
        remaining = context.time_remaining()
        if remaining is not None and remaining <= DEADLINE_SLACK_S:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED

    def _record(
        self, code: grpc.StatusCode, started: float, prefill: PrefillStats, sent: SendStats
    ) -> None:
        self.metrics.in_flight.dec()
        self.metrics.requests.labels(code=code.name).inc()
        self.metrics.phase_seconds.labels("total").observe(time.perf_counter() - started)
        self.metrics.kv_bytes.inc(sent.bytes_sent)
        if prefill.layers_done:
            self.metrics.phase_seconds.labels("prefill").observe(prefill.compute_s)
        if sent.send_s is not None:
            self.metrics.phase_seconds.labels("kv_send").observe(sent.send_s)

    async def Understand(
        self, request: UnderstandRequest | UndecodableRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[UnderstandEvent]:
        """Text out (`prefill_service.text`); failures map to a status as Generate's do."""
        raw_id = "" if isinstance(request, UndecodableRequest) else request.request_id
        request_id = raw_id or new_request_id()
        request_log = RequestLog(log, {"request_id": loggable(request_id, MAX_REQUEST_ID_CHARS)})
        try:
            if isinstance(request, UndecodableRequest):
                raise InvalidParams(
                    f"the request ({request.size} bytes) is not a valid UnderstandRequest: "
                    f"{request.error}"
                )
            source = self.source
            if source is None:
                raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
            check_request_id(request_id)
            async for event in understand_events(self.text, source, request, request_id):
                yield event
        except (asyncio.CancelledError, GeneratorExit):
            request_log.info("understand ended by the caller")
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes a status, in one place
            code, message = logged_status(request_log, "understand failed", e)
            await context.abort(code, message)

    async def _check(self, request: GenerateRequest, request_id: str) -> CheckedRequest:
        """Every check of a Generate request that needs no model compute, each once: the model is
        loaded, the request id, the input images (decoded; only where the source edits) and the
        parameters (`serving.params.validate`, an edit's defaulting to its input's size)."""
        source = self.source
        if source is None:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        check_request_id(request_id)
        config = source.config
        images = []
        defaults = None
        if request.input_images:
            if not (isinstance(source, EditKVSource) and source.supports_edits):
                raise InvalidParams(NO_IMAGE_INPUT)
            loop = asyncio.get_running_loop()
            images = await loop.run_in_executor(None, decode_input_images, request.input_images)
            width, height = source.edit_size(images[0])
            defaults = {**EDIT_DEFAULTS, "width": width, "height": height}
        params = GenerationParams.from_proto(request.params, defaults)
        limits = RequestLimits(
            pixel_step=config.pixels_per_token,
            max_side=config.max_image_size,
            num_layers=config.llm.num_layers,
        )
        validate(params, limits)
        return CheckedRequest(source, params, images)

    async def _think(
        self, request: GenerateRequest, checked: CheckedRequest
    ) -> AsyncIterator[str | Answer]:
        """A think request's plan: deltas, then the `Answer` (its text is the decode of all
        its tokens)."""
        source = checked.source
        image = checked.images[0] if checked.images else None
        planned = await asyncio.get_running_loop().run_in_executor(
            None, self.text.plan_request, source, request.prompt, request.think_sampling, image
        )
        async for item in self.text.decode(source, planned):
            if not isinstance(item, Queued):
                yield item

    async def _prepare(
        self,
        request: GenerateRequest,
        checked: CheckedRequest,
        request_id: str,
        stats: PrefillStats,
        request_log: RequestLog,
        think_plan: str | None = None,
    ) -> tuple[Iterator[list[bytes]], GenerateEvent]:
        """The plan of a checked request, before any compute; returns the lazy frame batches and
        the usage event (the conditional context's tokens, image tokens included). `think_plan`:
        the decoded plan of a think request, which its conditional context ends with."""
        source, params, images = checked.source, checked.params, checked.images
        config = source.config
        loop = asyncio.get_running_loop()
        if images:
            planned = await loop.run_in_executor(
                None, lambda: source.plan_edit(request.prompt, params, images[0], think_plan)
            )
        else:
            planned = await loop.run_in_executor(
                None, lambda: source.plan(request.prompt, params, think_plan)
            )
        check_token_counts(planned, token_limit(config, self.max_prompt_tokens))
        p = params
        request_log.info(
            "accepted: %s%dx%d, %d timesteps, seed %d, contexts %s",
            f"edit of a {images[0].width}x{images[0].height} image, " if images else "",
            p.width,
            p.height,
            p.num_timesteps,
            p.seed,
            ", ".join(f"{Branch(c.kind)}={c.num_tokens} tokens" for c in planned.contexts),
        )
        frames = request_frames(
            source,
            planned,
            request_id=request_id,
            params=params,
            stats=stats,
            chunk_size=self.chunk_size,
        )
        return frames, GenerateEvent(usage=Usage(prompt_tokens=prompt_tokens(planned)))
