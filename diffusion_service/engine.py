"""Rank 0's engine: one thread that owns every collective and runs jobs one at a time from a
bounded queue, and the handle through which a request's coroutine follows its job."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch
import torch.distributed as dist

from bagel.diffusion.generation import ForwardGraphs
from bagel.diffusion.pixels import decode_pixels
from bagel.diffusion.preview import LatentRGB, fit_latent_rgb
from bagel.network.autoencoder import AutoEncoder
from bagel.network.config import BagelConfig
from diffusion_service.job import Command, JobSpec
from diffusion_service.launch import RankGroup, exit_for_restart
from diffusion_service.memory import peaks_note, publish_peaks
from diffusion_service.metrics import DiffusionMetrics
from diffusion_service.settings import ServiceSettings
from diffusion_service.worker import JobCancelled, RankRuntime, model_contexts, run_job
from protos import GenerateEvent, Image, Latents, PartialImage, Progress, Timings
from serving.errors import ServiceError
from serving.imaging.png import encode_png
from serving.params import cache_policy_name
from transport.broadcast import broadcast_kv
from transport.errors import TransportError
from transport.layout import KVCache

log = logging.getLogger(__name__)
# zlib level 1: several times faster than zlib's default 6 for a slightly larger file
# (docs/benchmarks.md, "Figures behind code defaults"). `serving.imaging.png` spreads the work over threads.
PNG_COMPRESS_LEVEL = 1

DONE = object()
LOST_MESSAGE = "the diffusion ranks are gone and cannot be restarted; restart the diffusion service"
TORCHRUN_LOST_MESSAGE = "a diffusion rank failed; torchrun is restarting the whole rank group"


@dataclass
class JobHandle:
    """One request's job as both sides see it; events cross from the engine thread to the
    request's event loop."""

    spec: JobSpec
    cache: KVCache
    request_id: str
    loop: asyncio.AbstractEventLoop
    deadline: float | None = None  # time.monotonic() seconds
    receive_ms: float = 0.0
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, item: object) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def keep_going(self) -> bool:
        return not self._cancelled.is_set() and not self.expired

    def stop_reason(self) -> ServiceError:
        if self.expired:
            return ServiceError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"request {self.request_id}: deadline exceeded"
            )
        return ServiceError(grpc.StatusCode.CANCELLED, f"request {self.request_id} was cancelled")


class Engine:
    """Rank 0's job loop: one thread takes jobs from a bounded queue and runs each with every
    rank (`_run`); while idle it sends heartbeats, and it restarts the group when a collective
    fails."""

    def __init__(
        self,
        settings: ServiceSettings,
        config: BagelConfig,
        group: RankGroup,
        autoencoder: AutoEncoder,
        metrics: DiffusionMetrics,
        on_health: Callable[[bool], None],
    ) -> None:
        self.settings = settings
        self.config = config
        self.group = group
        self.autoencoder = autoencoder
        self.metrics = metrics
        self.on_health = on_health  # called with True/False from the engine thread
        self._queue: queue.Queue[JobHandle] = queue.Queue(maxsize=settings.max_queue)
        self._accepting = True
        self._stop = threading.Event()
        self._lost = False  # the ranks are gone for good (their launcher exited)
        self._lost_message = LOST_MESSAGE
        self._running: JobHandle | None = None
        self._latent_rgb: LatentRGB | None = None  # the previews' map, fitted on first use
        self._thread = threading.Thread(target=self._main, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def stopping(self) -> bool:
        return not self._accepting or self._stop.is_set()

    def submit(self, handle: JobHandle) -> int:
        """Queue a job; returns how many jobs are ahead of it. While the group restarts, the
        job waits in the queue (within its deadline)."""
        if not self._accepting:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE, "the diffusion service is shutting down"
            )
        if self._lost:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, self._lost_message)
        ahead = self._queue.qsize() + (1 if self._running is not None else 0)
        try:
            self._queue.put_nowait(handle)
        except queue.Full:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the queue is full ({self.settings.max_queue} requests waiting); retry later",
            ) from None
        self.metrics.queue_depth.set(self._queue.qsize())
        return ahead

    def stop(self, drain_s: float) -> None:
        """Finish queued and running work for up to `drain_s`, fail the rest with UNAVAILABLE,
        then shut the ranks down."""
        self._accepting = False
        deadline = time.monotonic() + drain_s
        while (
            self._running is not None or not self._queue.empty()
        ) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        running = self._running
        if running is not None:
            running.cancel()
        self._thread.join(timeout=self.settings.collective_timeout_s + 5)

    # ---- the engine thread -----------------------------------------------------------------

    def _main(self) -> None:
        while not self._stop.is_set():
            try:
                handle = self._queue.get(timeout=self.settings.heartbeat_s)
            except queue.Empty:
                if not self._lost:
                    self._heartbeat()
                continue
            self.metrics.queue_depth.set(self._queue.qsize())
            self._running = handle
            try:
                self._run(handle)
            finally:
                self._running = None
        self._fail_queued("the diffusion service shut down")
        self.group.shutdown()

    def _fail_queued(self, message: str) -> None:
        while True:
            try:
                handle = self._queue.get_nowait()
            except queue.Empty:
                return
            self._fail(handle, ServiceError(grpc.StatusCode.UNAVAILABLE, message))

    def _heartbeat(self) -> None:
        try:
            self.group.send(Command.HEARTBEAT)
        except Exception as e:  # noqa: BLE001 - any collective failure means a rank is gone
            log.error("rank group heartbeat failed: %s", e)
            self._restart()

    def _restart(self) -> None:
        self.on_health(False)
        if self.stopping:  # e.g. SIGTERM to the whole process group reached the workers too
            log.warning("a rank failed while the service is stopping: not restarting the group")
            return
        self.metrics.restarts.inc()
        if not self.group.can_restart:  # torchrun owns the ranks and restarts all of them
            self._lost, self._lost_message = True, TORCHRUN_LOST_MESSAGE
            self._fail_queued(TORCHRUN_LOST_MESSAGE)
            exit_for_restart("a collective failed")
        while not self.stopping:
            if not self.group.alive:
                log.error("the rank launcher has exited: %s", LOST_MESSAGE)
                self._lost = True
                return
            try:
                self.group.restart()
                self.on_health(True)
                return
            except Exception as e:  # noqa: BLE001
                if self.stopping or not self.group.alive:
                    continue  # said once, above or by the caller
                log.error("restarting the rank group failed, retrying: %s", e)
                time.sleep(1.0)

    def _fail(self, handle: JobHandle, error: ServiceError) -> None:
        handle.cache.release()
        handle.emit(error)

    def _run(self, handle: JobHandle) -> None:
        """One job: broadcast it, denoise it, make its output, and report timings and result;
        a failure anywhere leaves through `_report_failure`."""
        if not handle.keep_going() or self._stop.is_set():
            self._fail(handle, handle.stop_reason())
            return
        if self._lost:
            self._fail(handle, ServiceError(grpc.StatusCode.UNAVAILABLE, self._lost_message))
            return
        log.info("request %s: job %d starts", handle.request_id, handle.spec.job_id)
        shared: KVCache | None = None
        marks = [time.perf_counter()]  # started, broadcast, denoised, decoded
        try:
            runtime = self.group.runtime
            shared = self._broadcast(handle)
            marks.append(time.perf_counter())
            latents = self._denoise(handle, shared)
            marks.append(time.perf_counter())
            result = self._output(handle.spec, latents, runtime.graphs)
            marks.append(time.perf_counter())
        except Exception as e:  # noqa: BLE001 - each kind is mapped to the caller's status
            self._report_failure(handle, e)
            return
        finally:
            if shared is not None and shared is not handle.cache:
                shared.release()
            handle.cache.release()
        self._report_timings(handle, marks)
        self._report_result(handle, result, runtime, marks[-1] - marks[0])

    def _broadcast(self, handle: JobHandle) -> KVCache:
        """Tell every rank of the new job and hand them its KV cache; returns rank 0's copy."""
        self.group.send(Command.NEW_JOB, handle.spec)
        return broadcast_kv(
            handle.cache,
            group=dist.group.WORLD,
            device=self.group.runtime.device,
            timeout=self.settings.collective_timeout,
        )

    def _denoise(self, handle: JobHandle, shared: KVCache) -> torch.Tensor:
        """Rank 0's part of the job, streaming progress and previews to the caller."""
        runtime = self.group.runtime
        policy = cache_policy_name(handle.spec.params.cache)

        def progress(done: int, total: int, cached: bool) -> None:
            self.metrics.steps.labels(policy=policy, cached=str(cached).lower()).inc()
            handle.emit(
                GenerateEvent(progress=Progress(step=done, total_steps=total, cached=cached))
            )

        def preview(index: int, step: int, estimate: torch.Tensor) -> None:
            handle.emit(self._partial_image(handle.spec, index, step, estimate))

        return run_job(
            runtime,
            handle.spec,
            model_contexts(shared, runtime.model, runtime.device),
            keep_going=lambda: handle.keep_going() and not self._stop.is_set(),
            on_progress=progress,
            on_preview=preview,
        )

    def _report_timings(self, handle: JobHandle, marks: list[float]) -> None:
        """The job's phases into the metrics and to the caller."""
        started, broadcast_done, denoise_done, decode_done = marks
        ms = {
            "receive_ms": handle.receive_ms,
            "broadcast_ms": (broadcast_done - started) * 1e3,
            "denoise_ms": (denoise_done - broadcast_done) * 1e3,
            "decode_ms": (decode_done - denoise_done) * 1e3,
        }
        for phase, value in ms.items():
            self.metrics.phase_seconds.labels(phase.removesuffix("_ms")).observe(value / 1e3)
        handle.emit(GenerateEvent(timings=Timings(**ms)))

    def _report_result(
        self, handle: JobHandle, result: GenerateEvent, runtime: RankRuntime, took_s: float
    ) -> None:
        """The result and the end of the stream to the caller; every rank's peak memory into the
        metrics and the log."""
        handle.emit(result)
        handle.emit(DONE)
        publish_peaks(self.metrics, runtime.peak_memory, runtime.device)
        log.info(
            "request %s: done in %.0f ms%s",
            handle.request_id,
            took_s * 1e3,
            peaks_note(runtime.peak_memory, runtime.device),
        )

    def _report_failure(self, handle: JobHandle, error: Exception) -> None:
        """What the caller is told when a job fails, by the kind of failure (the servicer's
        `status_of` turns an unexpected exception into INTERNAL); a failed collective also
        restarts the group."""
        if isinstance(error, JobCancelled):
            log.info("request %s: stopped", handle.request_id)
            status = handle.stop_reason()
            if self._stop.is_set():
                status = ServiceError(
                    grpc.StatusCode.UNAVAILABLE, "the diffusion service shut down"
                )
            handle.emit(status)
        elif isinstance(error, (RuntimeError, TransportError)):  # a rank is gone or hung
            log.error("request %s: rank group failed: %s", handle.request_id, error)
            handle.emit(
                ServiceError(grpc.StatusCode.UNAVAILABLE, f"a diffusion rank failed: {error}")
            )
            self._restart()
        elif isinstance(error, ServiceError):  # the job's result is unusable: its own status
            log.warning("request %s: %s: %s", handle.request_id, error.code.name, error.message)
            handle.emit(error)
        else:  # reported to the caller as INTERNAL
            log.exception("request %s failed", handle.request_id, exc_info=error)
            handle.emit(error)

    def _partial_image(
        self, spec: JobSpec, index: int, step: int, estimate: torch.Tensor
    ) -> GenerateEvent:
        """A preview event: the clean-image estimate through the fixed latent -> RGB map."""
        if self._latent_rgb is None:  # fitted on the first request that asks for previews
            self._latent_rgb = fit_latent_rgb(self.autoencoder)
        rows, cols = self.config.latent_grid(spec.params.height, spec.params.width)
        pixels = self._latent_rgb.pixels(estimate, rows, cols, self.config.latent_patch_size)
        height, width = pixels.shape[:2]
        return GenerateEvent(
            partial_image=PartialImage(
                png=encode_png(pixels, level=PNG_COMPRESS_LEVEL),
                width=width,
                height=height,
                index=index,
                step=step,
            )
        )

    def _output(
        self, spec: JobSpec, latents: torch.Tensor, graphs: ForwardGraphs | None = None
    ) -> GenerateEvent:
        """The job's result event; DATA_LOSS instead of an image made of NaN or Inf latents."""
        if not torch.isfinite(latents).all():
            raise ServiceError(
                grpc.StatusCode.DATA_LOSS,
                f"job {spec.job_id}: the denoised latents hold NaN or Inf values "
                f"({int((~torch.isfinite(latents)).sum())} of {latents.numel()}); no image was "
                f"made",
            )
        params = spec.params
        if params.latents_only:
            data = latents.float().contiguous().numpy().tobytes()
            return GenerateEvent(
                latents=Latents(data=data, shape=list(latents.shape), seed=params.seed)
            )
        pixels = decode_pixels(
            self.autoencoder, self.config, latents, params.height, params.width, graphs
        )
        if pixels.dtype != np.uint8 or pixels.shape != (params.height, params.width, 3):
            raise ServiceError(
                grpc.StatusCode.INTERNAL,
                f"job {spec.job_id}: the decoder made a {pixels.dtype} {list(pixels.shape)} "
                f"image, not uint8 {[params.height, params.width, 3]}",
            )
        png = encode_png(pixels, level=PNG_COMPRESS_LEVEL)
        return GenerateEvent(
            image=Image(png=png, width=params.width, height=params.height, seed=params.seed)
        )
