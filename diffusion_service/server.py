"""The diffusion service's server: `bagel.v1.Diffusion` on the shared server shape
(`serving.service.server.GrpcServer`: health, reflection, metrics), the rank group and the engine started
in the background (health NOT_SERVING until they are), and a graceful stop on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc
import torch

from bagel.checkpoints.checkpoint import load_autoencoder
from bagel.checkpoints.model_info import read_checkpoint_facts
from bagel.devices import default_dtype
from bagel.network.attention import fp8_attention_kernel_runs
from bagel.network.config import BagelConfig
from bagel.network.fp8 import runs_on_fp8_tensor_cores
from diffusion_service.engine import Engine
from diffusion_service.launch import rank_group, validate_settings
from diffusion_service.memory import peaks_note, publish_peaks
from diffusion_service.metrics import DiffusionMetrics
from diffusion_service.servicer import DiffusionServicer
from diffusion_service.settings import ServiceSettings
from diffusion_service.worker import rank_device
from protos import DIFFUSION_SERVICE, GenerateEvent, ModelInfo
from serving.params import cache_policy_name
from serving.service.access import RefusalLog
from serving.service.credentials import CredentialReloader, ServerCredentialStore
from serving.service.model_info import model_info, model_info_handler
from serving.service.security import risky_settings
from serving.service.server import GrpcServer, serve_until_signal
from transport.buffers import tune_malloc
from transport.rpc import diffusion_handler

log = logging.getLogger(__name__)


class DiffusionServer:
    """One diffusion service: rank 0's gRPC server, its rank group and its engine. Construct it
    before any thread starts (the rank group forks its launcher); `start()` serves at once and
    `loaded` finishes when the ranks are up and health says SERVING."""

    def __init__(self, settings: ServiceSettings, config: BagelConfig) -> None:
        self.settings = settings
        self.config = config
        secrets = settings.security.load()  # a bad file fails before any process starts
        for warning in risky_settings(settings.listen, settings.security):
            log.warning("%s", warning)
        self.group = rank_group(settings)  # our own ranks fork their launcher here
        self.metrics = DiffusionMetrics()
        # gRPC objects only after the fork
        credentials = ServerCredentialStore(settings.security, secrets)
        self.reloader = CredentialReloader([credentials])
        self.engine: Engine | None = None
        facts = read_checkpoint_facts(settings.model_dir, config)
        self.model_info = model_info(
            name=facts.name,
            fingerprint=config.fingerprint(),
            native_size=facts.native_size,
            max_size=config.max_image_size,
            size_step=config.pixels_per_token,
            can_edit=True,  # the edit's contexts arrive as KV like any other
            precision=precision_name(settings),
            layout=f"{settings.world_size} rank(s): {settings.parallel.describe()}",
        )
        self.servicer: DiffusionServicer | None = None
        self.grpc = GrpcServer(
            DIFFUSION_SERVICE,
            settings.listen,
            lambda server: server.add_generic_rpc_handlers(
                (
                    diffusion_handler(self._generate),
                    model_info_handler(DIFFUSION_SERVICE, self.describe),
                )
            ),
            self.metrics,
            settings.metrics_host,
            settings.metrics_port,
            credentials=credentials.server_credentials(),
            interceptors=credentials.interceptors(RefusalLog(self.metrics.auth_failures)),
        )
        self.loaded: asyncio.Future | None = None

    async def start(self) -> int:
        port = await self.grpc.start()
        self.reloader.start()
        self.loaded = asyncio.ensure_future(self._load())
        return port

    async def _load(self) -> None:
        loop = asyncio.get_running_loop()
        settings = self.settings
        started = time.perf_counter()
        runtime = await asyncio.to_thread(self.group.start)
        device = rank_device(settings, 0)
        if settings.linear_precision == "fp8" and not runs_on_fp8_tensor_cores(device):
            log.warning(
                "fp8 linears on %s: no FP8 tensor cores (sm_89 or later) here, so they run the "
                "plain-PyTorch FP8 reference, slower than bf16",
                torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU",
            )
        if settings.attention_precision == "fp8" and not fp8_attention_kernel_runs(device):
            log.warning(
                "fp8 attention on %s: no Triton FP8 attention kernel here (it needs sm_89 or "
                "later and Triton), so it runs the plain-PyTorch reference, slower than bf16",
                torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU",
            )
        autoencoder = await asyncio.to_thread(
            load_autoencoder, settings.model_dir, default_dtype(device), device
        )

        def on_health(serving: bool) -> None:  # called from the engine thread
            asyncio.run_coroutine_threadsafe(self.grpc.set_serving(serving), loop)

        engine = Engine(settings, self.config, self.group, autoencoder, self.metrics, on_health)
        self.servicer = DiffusionServicer(settings, self.config, engine, self.metrics)
        self.engine = engine
        engine.start()
        load_s = time.perf_counter() - started
        self.metrics.model_load_seconds.set(load_s)
        publish_peaks(self.metrics, runtime.peak_memory, device)
        await self.grpc.set_serving(True)
        log.info(
            "serving on %s (port %d): preset %s: %s, %s, %s, default cache %s; loaded in %.1f s%s",
            settings.listen,
            self.grpc.port,
            settings.preset,
            settings.parallel.describe(),
            settings.device,
            precision_name(settings),
            cache_policy_name(settings.default_cache),
            load_s,
            peaks_note(runtime.peak_memory, device),
        )

    async def describe(self) -> ModelInfo:
        return self.model_info

    async def _generate(
        self, frames: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[GenerateEvent]:
        if self.servicer is None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "the diffusion service is loading (its ranks are starting); retry shortly",
            )
        async for event in self.servicer.generate(frames, context):
            yield event

    async def stop(self, drain_s: float) -> None:
        """NOT_SERVING at once, finish queued work for up to `drain_s`, then stop the ranks."""
        self.reloader.stop()
        await self.grpc.set_serving(False)
        if self.engine is not None:
            await asyncio.to_thread(self.engine.stop, drain_s)
        elif self.loaded is not None and not self.loaded.done():
            self.loaded.cancel()
        await self.grpc.stop(grace=1.0)

    def close(self) -> None:
        self.group.close()


def precision_name(settings: ServiceSettings) -> str:
    """The ranks' precision: fp32 on CPU, bf16 on CUDA, then FP8 linears and FP8 attention
    where set."""
    name = "bf16" if default_dtype(settings.device) == torch.bfloat16 else "fp32"
    name += " + fp8 linears" if settings.linear_precision == "fp8" else ""
    return name + (" + fp8 attention" if settings.attention_precision == "fp8" else "")


def run(settings: ServiceSettings) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status."""
    config = validate_settings(settings)  # a bad topology fails here, before any process starts
    tune_malloc()  # ~1 MiB frames otherwise make glibc return and re-fault pages all the time
    server = DiffusionServer(settings, config)  # forks: before any thread exists
    try:
        loading = f"starting {settings.world_size} ranks"
        return asyncio.run(serve_until_signal(server, settings.listen, settings.drain_s, loading))
    finally:
        server.close()
