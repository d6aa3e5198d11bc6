"""The Diffusion.Generate servicer on rank 0: verify and assemble the KV stream, check the
parameters, queue the job, and stream its events; every failure leaves through `status_of`."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc

from bagel.config import BagelConfig
from diffusion_service.engine import DONE, Engine, JobHandle
from diffusion_service.job import JobSpec
from diffusion_service.metrics import DiffusionMetrics
from diffusion_service.settings import ServiceSettings
from diffusion_service.step_cache import check_step_cache
from protos import Accepted, GenerateEvent
from serving.errors import status_of
from serving.params import GenerationParams, check_cache_fits
from transport.assembler import FrameAssembler, KVSpec
from transport.buffers import BufferPool
from transport.rpc import receive_kv

log = logging.getLogger(__name__)


class DiffusionServicer:
    def __init__(
        self,
        settings: ServiceSettings,
        config: BagelConfig,
        engine: Engine,
        metrics: DiffusionMetrics,
    ) -> None:
        self.settings = settings
        self.config = config
        self.engine = engine
        self.metrics = metrics
        llm = config.llm
        self.expect = KVSpec(config.fingerprint(), llm.num_layers, llm.num_kv_heads, llm.head_dim)
        self._job_ids = itertools.count(1)
        # Flat KV buffers stay allocated (and their pages warm) from one request to the next;
        # pinned on a GPU host so the one host-to-device copy runs at full speed.
        self.buffers = BufferPool(
            max_idle_bytes=2 * settings.max_kv_bytes, pin_memory=settings.device == "cuda"
        )

    def checked_params(self, msg) -> GenerationParams:
        """The request's parameters with defaults filled in, or InvalidParams naming the fault."""
        params = GenerationParams.from_proto(msg).with_cache_default(self.settings.default_cache)
        params.validate(self.config.pixels_per_token, self.config.max_image_size)
        check_step_cache(params.cache)
        check_cache_fits(params.cache, self.config.llm.num_layers)
        return params

    async def generate(
        self, frames: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[GenerateEvent]:
        handle: JobHandle | None = None
        received = None
        request_id = "-"
        status = grpc.StatusCode.OK
        recorded = False
        try:
            started = time.perf_counter()
            assembler = FrameAssembler(
                self.expect, max_bytes=self.settings.max_kv_bytes, buffers=self.buffers
            )
            received = await receive_kv(frames, assembler)
            request_id = received.request_id or uuid.uuid4().hex[:16]
            self.metrics.kv_bytes.inc(received.cache.layout.total_bytes)
            params = self.checked_params(received.params)
            remaining = context.time_remaining()
            handle = JobHandle(
                spec=JobSpec(next(self._job_ids), params),
                cache=received.cache,
                request_id=request_id,
                loop=asyncio.get_running_loop(),
                deadline=None if remaining is None else time.monotonic() + remaining,
                receive_ms=(time.perf_counter() - started) * 1e3,
            )
            position = self.engine.submit(handle)
            log.info("request %s: accepted at queue position %d", request_id, position)
            yield GenerateEvent(accepted=Accepted(request_id=request_id, queue_position=position))
            while (item := await handle.events.get()) is not DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        except asyncio.CancelledError:
            status = grpc.StatusCode.CANCELLED
            log.info("request %s: cancelled by the client", request_id)
            raise
        except Exception as e:  # noqa: BLE001 - mapped to a status in one place
            status, message = status_of(e)
            log.info("request %s: %s: %s", request_id, status.name, message)
            # Counted before the status leaves: a caller that reads the metrics once it has
            # the status must find this call in them.
            self.metrics.requests.labels(code=status.name).inc()
            recorded = True
            await context.abort(status, message)
        finally:
            if handle is not None:
                handle.cancel()  # a no-op once the job has finished
            elif received is not None:
                received.cache.release()
            if not recorded:
                self.metrics.requests.labels(code=status.name).inc()
