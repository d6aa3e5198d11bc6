"""The Diffusion.Generate servicer on rank 0: verify and assemble the KV stream (bounded: an idle
timeout between frames, a byte budget for all uploads in flight), check the request id, the
parameters and that the KV is finite, queue the job, and stream its events; every failure leaves
through `status_of`."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator

import grpc

from bagel.network.config import BagelConfig
from diffusion_service.engine import DONE, Engine, JobHandle
from diffusion_service.job import JobSpec
from diffusion_service.metrics import DiffusionMetrics
from diffusion_service.settings import ServiceSettings
from protos import Accepted, GenerateEvent
from serving.errors import status_of
from serving.params import GenerationParams, RequestLimits, validate
from serving.service.requests import check_request_id, loggable
from transport.admission import UploadBudget
from transport.assembler import FrameAssembler, KVSpec, check_finite
from transport.buffers import BufferPool
from transport.errors import Fault, TransportError
from transport.rpc import receive_kv

log = logging.getLogger(__name__)
LOGGED_MESSAGE_CHARS = 300  # a status message may quote what the sender put in its header
IDLE_POOL_RELEASE_S = 10.0
DEADLINE_SLACK_S = 0.05  # a caller's deadline fires a little before ours (it travels rounded up)


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
        self.limits = RequestLimits(
            pixel_step=config.pixels_per_token,
            max_side=config.max_image_size,
            num_layers=llm.num_layers,
        )
        self._job_ids = itertools.count(1)
        # Flat KV buffers stay allocated (and their pages warm) from one request to the next;
        # pinned on a GPU host so the one host-to-device copy runs at full speed. Once no upload
        # or job has held one for a while, only one largest cache's worth stays.
        self.buffers = BufferPool(
            max_idle_bytes=2 * settings.max_kv_bytes,
            keep_idle_bytes=settings.max_kv_bytes,
            release_after_s=IDLE_POOL_RELEASE_S,
            pin_memory=settings.device == "cuda",
        )
        self.uploads = UploadBudget(settings.max_inflight_kv_bytes, stall_s=settings.kv_stall_s)
        metrics.kv_uploads.set_function(lambda: self.uploads.uploads)
        metrics.kv_upload_bytes.set_function(lambda: self.uploads.held_bytes)

    def checked_params(self, msg) -> GenerationParams:
        """The request's parameters with defaults filled in, or InvalidParams naming the fault."""
        params = GenerationParams.from_proto(msg).with_cache_default(self.settings.default_cache)
        validate(params, self.limits)
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
                self.expect,
                max_bytes=self.settings.max_kv_bytes,
                buffers=self.buffers,
                budget=self.uploads,
            )
            received = await receive_kv(
                frames,
                assembler,
                idle_timeout_s=self.settings.kv_idle_timeout_s,
                first_frame_timeout_s=self.settings.kv_first_frame_timeout_s,
            )
            request_id = check_request_id(received.request_id)
            self.metrics.kv_bytes.inc(received.cache.layout.total_bytes)
            await asyncio.to_thread(check_finite, received.cache)
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
        except (asyncio.CancelledError, GeneratorExit):
            # The caller went away or its deadline passed: gRPC cancels the handler, or closes
            # this generator where it waits at a `yield` for the caller to take an event.
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= DEADLINE_SLACK_S
            status = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            log.info("request %s: ended by the client: %s", request_id, status.name)
            raise
        except Exception as e:  # noqa: BLE001 - mapped to a status in one place
            if isinstance(e, TransportError) and e.fault is Fault.EVICTED:
                self.metrics.kv_evictions.inc()
            status, message = status_of(e)
            log.info(
                "request %s: %s: %s",
                request_id,  # "-" or checked: printable ASCII
                status.name,
                loggable(message, LOGGED_MESSAGE_CHARS),
            )
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
