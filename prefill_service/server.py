"""The prefill service's gRPC server: `bagel.v1.Prefill`, `grpc.health.v1.Health` and server
reflection on one grpc.aio server, the model loaded in the background (health NOT_SERVING until it
is), metrics on their own port, and a graceful stop on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from prefill_service.metrics import PrefillMetrics
from prefill_service.prefill import KVSource
from prefill_service.relay import DiffusionLink
from prefill_service.servicer import PrefillServicer
from prefill_service.settings import PrefillSettings
from protos import PREFILL_SERVICE, add_PrefillServicer_to_server
from protos.options import server_options

logger = logging.getLogger("prefill_service")
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVICE_NAMES = (PREFILL_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME)
_HEALTH_NAMES = ("", PREFILL_SERVICE)  # "" is the whole server


class PrefillServer:
    """One prefill server. `start()` binds and serves at once; `loaded` finishes when the source
    is loaded and health says SERVING. `load_source` runs on a worker thread."""

    def __init__(self, settings: PrefillSettings, load_source: Callable[[], KVSource]) -> None:
        self.settings = settings
        self._load_source = load_source
        self.metrics = PrefillMetrics()
        self.link = DiffusionLink(settings.diffusion, connect_timeout_s=settings.connect_timeout_s)
        self.servicer = PrefillServicer(
            self.link,
            self.metrics,
            chunk_size=settings.chunk_size,
            max_prompt_tokens=settings.max_prompt_tokens,
        )
        self.health = health.aio.HealthServicer()
        self.loaded: asyncio.Future | None = None
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None

    async def start(self) -> int:
        """Serve on `settings.listen`; returns the bound port (useful with port 0)."""
        server = grpc.aio.server(options=server_options())
        add_PrefillServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(SERVICE_NAMES, server)
        for name in _HEALTH_NAMES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = server.add_insecure_port(self.settings.listen)
        if not self.port:
            raise RuntimeError(f"cannot listen on {self.settings.listen}")
        await server.start()
        self._server = server
        if self.settings.metrics_port is not None:
            self.metrics.serve(self.settings.listen_host, self.settings.metrics_port)
        self.loaded = asyncio.ensure_future(self._load())
        return self.port

    async def _load(self) -> None:
        source = await asyncio.get_running_loop().run_in_executor(None, self._load_source)
        self.servicer.source = source
        for name in _HEALTH_NAMES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info(
            "serving: model %s, KV dtype %s, diffusion service at %s",
            source.config.fingerprint(),
            source.dtype,
            self.settings.diffusion,
        )

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING at once; in-flight calls get `grace` seconds, then are cancelled."""
        await self.health.enter_graceful_shutdown()
        if self.loaded is not None and not self.loaded.done():
            self.loaded.cancel()
        if self._server is not None:
            await self._server.stop(grace)
        self.link.close()
        self.metrics.close()


async def serve(settings: PrefillSettings, load_source: Callable[[], KVSource]) -> int:
    """Run a server until SIGTERM/SIGINT (or a failed model load); returns the exit status."""
    server = PrefillServer(settings, load_source)
    port = await server.start()
    logger.info("listening on %s (port %d); loading the model", settings.listen, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopping = asyncio.ensure_future(stop.wait())
    assert server.loaded is not None
    await asyncio.wait({stopping, server.loaded}, return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if server.loaded.done() and not server.loaded.cancelled() and server.loaded.exception():
        error = server.loaded.exception()
        logger.error("loading the model failed: %s: %s", type(error).__name__, error)
        status = 1
    else:
        await stopping
    logger.info("stopping: draining in-flight requests for up to %.1f s", settings.drain_s)
    await server.stop(settings.drain_s)
    stopping.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await stopping
    logger.info("stopped")
    return status


def configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
