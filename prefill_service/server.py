"""The prefill service's server: `bagel.v1.Prefill` on the shared server shape
(`serving.service.server.GrpcServer`: health, reflection, metrics), the KV source loaded in the
background, health SERVING only while the source is loaded and the diffusion service (one of
them, with several: `routing.DiffusionRouter`) is SERVING, and a graceful stop on SIGTERM/SIGINT.

The model's GPU work runs on two long-lived threads that take turns on it
(`model_turns.ModelTurns`): the KV-prefill worker (`kv_worker.KVWorker`, every Generate
request's KV) and the text decode thread (`decode_scheduler`, Understand and think plans). Both
stop with the server."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc
import torch

from bagel.checkpoints.model_info import read_checkpoint_facts
from prefill_service.kv_worker import KVWorker
from prefill_service.metrics import PrefillMetrics
from prefill_service.model_turns import ModelTurns
from prefill_service.prefill import EditKVSource, KVSource
from prefill_service.relay import DiffusionLink
from prefill_service.routing import DiffusionRouter
from prefill_service.servicer import PrefillServicer, prefill_handler
from prefill_service.settings import PrefillSettings
from prefill_service.text import TextSide
from protos import PREFILL_SERVICE, DiffusionStub, ModelInfo, ModelInfoRequest
from serving.errors import ServiceError
from serving.service.access import RefusalLog
from serving.service.credentials import (
    ClientCredentialStore,
    CredentialReloader,
    ServerCredentialStore,
)
from serving.service.model_info import model_info, model_info_handler
from serving.service.security import SecurityError, is_loopback, risky_settings
from serving.service.server import GrpcServer, serve_until_signal

log = logging.getLogger(__name__)
DIFFUSION_INFO_TIMEOUT_S = 2.0
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class PrefillServer:
    """One prefill server. `start()` binds and serves at once; `loaded` finishes when the source
    is loaded (health says SERVING once the diffusion service does too). `load_source` runs on a worker thread."""

    def __init__(self, settings: PrefillSettings, load_source: Callable[[], KVSource]) -> None:
        self.settings = settings
        self._load_source = load_source
        self.metrics = PrefillMetrics()
        # A bad file or an empty token fails here, at start-up; SIGHUP reloads them all.
        credentials = ServerCredentialStore(settings.security)
        link_credentials = ClientCredentialStore(
            settings.diffusion_security,
            on_tls_change=self._reopen_links,
            private_flag=settings.diffusion_token_flag,
        )
        self.reloader = CredentialReloader([credentials, link_credentials])
        warn_about_risky_settings(settings)
        self.router = DiffusionRouter(
            [
                DiffusionLink(
                    address,
                    connect_timeout_s=settings.connect_timeout_s,
                    security=settings.diffusion_security,
                    token=link_credentials.token,
                )
                for address in settings.diffusion_addresses
            ],
            self.metrics,
        )
        turns = ModelTurns()
        self.worker = KVWorker(turns)
        self.servicer = PrefillServicer(
            self.router,
            self.metrics,
            worker=self.worker,
            chunk_size=settings.chunk_size,
            max_prompt_tokens=settings.max_prompt_tokens,
            text=TextSide(settings.max_decode_batch, settings.max_decode_tokens, turns),
        )
        self.grpc = GrpcServer(
            PREFILL_SERVICE,
            settings.listen,
            lambda server: server.add_generic_rpc_handlers(
                (
                    prefill_handler(self.servicer),
                    model_info_handler(PREFILL_SERVICE, self.describe),
                )
            ),
            self.metrics,
            settings.metrics_host,
            settings.metrics_port,
            credentials=credentials.server_credentials(),
            interceptors=credentials.interceptors(RefusalLog(self.metrics.auth_failures)),
        )
        self.loaded: asyncio.Future | None = None
        self._logged_serving: bool | None = None
        self._model_info: ModelInfo | None = None

    @property
    def port(self) -> int | None:
        return self.grpc.port

    async def start(self) -> int:
        """Serve on `settings.listen`; returns the bound port (useful with port 0)."""
        port = await self.grpc.start()
        self.reloader.start()
        self.router.watch(lambda serving: self._publish_health())
        self.loaded = asyncio.ensure_future(self._load())
        return port

    async def _publish_health(self) -> None:
        """SERVING only while the model is loaded and the health of the diffusion service (of at
        least one, with several), asked every second, says SERVING. The log says "serving" only
        when that is so."""
        serving = self.servicer.source is not None and self.router.serving
        await self.grpc.set_serving(serving)
        if self.servicer.source is None or serving == self._logged_serving:
            return
        self._logged_serving = serving
        if serving:
            log.info(
                "serving on %s: diffusion service %s", self.settings.listen, self.router.describe()
            )
        else:
            log.warning(
                "not serving: no diffusion service is serving (%s); requests wait for one",
                self.router.describe(),
            )

    async def _load(self) -> None:
        started = time.perf_counter()
        source = await asyncio.get_running_loop().run_in_executor(None, self._load_source)
        self.metrics.model_load_seconds.set(time.perf_counter() - started)
        watch_peak_memory(self.metrics)
        self.servicer.source = source
        await self.router.check_health()
        log.info("model %s loaded, KV dtype %s", source.config.fingerprint(), source.dtype)
        await self._publish_health()

    async def describe(self) -> ModelInfo:
        """GetModelInfo: the checkpoint's facts from here; precision and layout from the diffusion
        service that serves (this service's own when none answers)."""
        source = self.servicer.source
        if source is None:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        if self._model_info is None:
            config = source.config
            facts = await asyncio.to_thread(read_checkpoint_facts, self.settings.model_dir, config)
            self._model_info = model_info(
                name=facts.name,
                fingerprint=config.fingerprint(),
                native_size=facts.native_size,
                max_size=config.max_image_size,
                size_step=config.pixels_per_token,
                can_edit=isinstance(source, EditKVSource) and source.supports_edits,
                can_understand=TextSide.can_decode(source),
                precision=DTYPE_NAMES.get(source.dtype, str(source.dtype)),
                layout="prefill only",
            )
        info = ModelInfo()
        info.CopyFrom(self._model_info)
        diffusion = await self._diffusion_model_info()
        if diffusion is not None:
            info.precision, info.layout = diffusion.precision, diffusion.layout
        return info

    async def _diffusion_model_info(self) -> ModelInfo | None:
        for group in self.router.groups:
            if not group.serving:
                continue
            stub = DiffusionStub(group.link.channel)
            try:
                return await asyncio.to_thread(
                    stub.GetModelInfo, ModelInfoRequest(), timeout=DIFFUSION_INFO_TIMEOUT_S
                )
            except grpc.RpcError as e:
                log.info("GetModelInfo of the diffusion service at %s: %s", group.address, e.code())
        return None

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING at once; in-flight calls get `grace` seconds, then are cancelled."""
        self.reloader.stop()
        if self.loaded is not None and not self.loaded.done():
            self.loaded.cancel()
        await self.grpc.stop(grace)
        self.router.close()
        await asyncio.to_thread(self.worker.close)
        self.servicer.text.close()

    def _reopen_links(self) -> None:
        """New TLS files for the hop: new channels (calls in flight finish on the old ones)."""
        for group in self.router.groups:
            group.link.reopen()


def warn_about_risky_settings(settings: PrefillSettings) -> None:
    warnings = risky_settings(settings.listen, settings.security)
    hop = settings.diffusion_security
    if hop.auth_token_file is not None and not hop.tls:
        remote = [a for a in settings.diffusion_addresses if not is_loopback(a)]
        if remote:
            warnings.append(
                f"--diffusion-auth-token-file without --diffusion-tls-ca: the hop token crosses "
                f"the network to {', '.join(remote)} in plaintext"
            )
    for warning in warnings:
        log.warning("%s", warning)


def watch_peak_memory(metrics: PrefillMetrics) -> None:
    """Once the model is on a GPU: `bagel_prefill_peak_memory_bytes{rank="0"}` reads the
    allocator's peaks at each scrape."""
    if not torch.cuda.is_initialized():
        return
    device = torch.cuda.current_device()
    gauge = metrics.peak_memory_bytes
    gauge.labels(rank="0", kind="reserved").set_function(
        lambda: torch.cuda.max_memory_reserved(device)
    )
    gauge.labels(rank="0", kind="allocated").set_function(
        lambda: torch.cuda.max_memory_allocated(device)
    )


async def serve(settings: PrefillSettings, load_source: Callable[[], KVSource]) -> int:
    """Run a server until SIGTERM/SIGINT (or a failed model load); returns the exit status."""
    try:
        server = PrefillServer(settings, load_source)
    except SecurityError as e:
        log.error("%s", e)
        return 2
    return await serve_until_signal(server, settings.listen, settings.drain_s, "loading the model")
