"""The `bagel.v1.Prefill` servicer: validates a request before any compute, hands it to
`prefill.request_frames` and `relay.relay`, and maps failures to a status through
`transport.status` (the one place that does)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import grpc

from bagel.kv import Branch
from prefill_service.metrics import PrefillMetrics
from prefill_service.prefill import (
    DEFAULT_MAX_PROMPT_TOKENS,
    KVSource,
    PrefillStats,
    check_token_counts,
    request_frames,
    token_limit,
)
from prefill_service.relay import DiffusionLink, SendStats, relay
from protos import GenerateEvent, GenerateRequest, service_pb2_grpc
from serving.errors import InvalidParams, ServiceError, status_of
from serving.params import GenerationParams, check_cache_fits
from transport import DEFAULT_CHUNK_SIZE

log = logging.getLogger(__name__)
MAX_REQUEST_ID_CHARS = 128


class RequestLog(logging.LoggerAdapter):
    """Prefixes every message with the request id."""

    def process(self, msg, kwargs):
        return f"[{self.extra['request_id']}] {msg}", kwargs


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


class PrefillServicer(service_pb2_grpc.PrefillServicer):
    """`source` is None until the model is loaded; requests meanwhile get UNAVAILABLE."""

    def __init__(
        self,
        link: DiffusionLink,
        metrics: PrefillMetrics,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    ) -> None:
        self.source: KVSource | None = None
        self.max_prompt_tokens = max_prompt_tokens
        self.link = link
        self.metrics = metrics
        self.chunk_size = chunk_size

    async def Generate(
        self, request: GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[GenerateEvent]:
        request_id = request.request_id or new_request_id()
        request_log = RequestLog(log, {"request_id": request_id})
        started = time.perf_counter()
        prefill, sent = PrefillStats(), SendStats()
        code = grpc.StatusCode.OK
        recorded = False
        self.metrics.in_flight.inc()
        try:
            batches = await self._prepare(request, request_id, prefill, request_log)
            async for event in relay(
                self.link,
                batches,
                time_remaining=context.time_remaining,
                prefill=prefill,
                sent=sent,
            ):
                yield event
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            request_log.info("ended by the caller: %s", code.name)
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes a status, in one place
            code, message = status_of(e)
            level = logging.ERROR if code is grpc.StatusCode.INTERNAL else logging.WARNING
            request_log.log(
                level, "failed: %s: %s", code.name, message, exc_info=level >= logging.ERROR
            )
            # Counted before the status leaves: a caller that reads the metrics once it has
            # the status must find this call in them.
            self._record(code, started, prefill, sent)
            recorded = True
            await context.abort(code, message)
        finally:
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

    async def _prepare(
        self,
        request: GenerateRequest,
        request_id: str,
        stats: PrefillStats,
        request_log: RequestLog,
    ) -> Iterator[list[bytes]]:
        """Every check, before any compute; returns the lazy frame batches."""
        source = self.source
        if source is None:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        if len(request_id) > MAX_REQUEST_ID_CHARS or not request_id.isprintable():
            raise InvalidParams(
                f"request_id must be printable and at most {MAX_REQUEST_ID_CHARS} characters"
            )
        config = source.config
        params = GenerationParams.from_proto(request.params)
        params.validate(config.pixels_per_token, config.max_image_size)
        check_cache_fits(params.cache, config.llm.num_layers)
        loop = asyncio.get_running_loop()
        planned = await loop.run_in_executor(None, source.plan, request.prompt, params)
        check_token_counts(planned.contexts, token_limit(config, self.max_prompt_tokens))
        p = params
        request_log.info(
            "accepted: %dx%d, %d timesteps, seed %d, contexts %s",
            p.width,
            p.height,
            p.num_timesteps,
            p.seed,
            ", ".join(f"{Branch(c.kind)}={c.num_tokens} tokens" for c in planned.contexts),
        )
        return request_frames(
            source,
            planned,
            request_id=request_id,
            params=params,
            stats=stats,
            chunk_size=self.chunk_size,
        )
