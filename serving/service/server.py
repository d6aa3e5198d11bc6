"""The server shape both services share: one grpc.aio server with the standard health service
(NOT_SERVING until the service says otherwise) and reflection, Prometheus metrics on their own
address, logging, and running until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.options import server_options
from serving.service.metrics import ServiceMetrics
from serving.service.startup import StartupError

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
log = logging.getLogger(__name__)


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)


class GrpcServer:
    """A service's gRPC server. `register(server)` adds the service's handlers; `service_name`
    is the full name health reports under (besides "", the whole server). `credentials`: serve
    TLS (else plaintext); `interceptors`: e.g. the bearer-token check (`serving.service.security`)."""

    def __init__(
        self,
        service_name: str,
        listen: str,
        register: Callable[[grpc.aio.Server], None],
        metrics: ServiceMetrics,
        metrics_host: str,
        metrics_port: int | None,
        *,
        credentials: grpc.ServerCredentials | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        self.service_name = service_name
        self.listen = listen
        self.metrics = metrics
        self.metrics_host = metrics_host
        self.metrics_port = metrics_port
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self._register = register
        self._credentials = credentials
        self._interceptors = tuple(interceptors)
        self._server: grpc.aio.Server | None = None

    async def start(self) -> int:
        """Bind, serve (health NOT_SERVING) and expose metrics; returns the bound port."""
        server = grpc.aio.server(options=server_options(), interceptors=self._interceptors)
        self._register(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (self.service_name, HEALTH_SERVICE, reflection.SERVICE_NAME), server
        )
        await self.set_serving(False)
        try:
            if self._credentials is None:
                self.port = server.add_insecure_port(self.listen)
            else:
                self.port = server.add_secure_port(self.listen, self._credentials)
        except RuntimeError:  # gRPC's "Failed to bind": taken since `check_port_free` looked
            self.port = 0
        if not self.port:
            raise StartupError(
                f"--listen {self.listen}: cannot bind (the port is in use, or the address is not "
                "this host's)"
            )
        await server.start()
        self._server = server
        if self.metrics_port is not None:
            self.metrics.serve(self.metrics_host, self.metrics_port)
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", self.service_name):
            await self.health.set(name, status)

    async def stop(self, grace: float | None) -> None:
        """NOT_SERVING at once; in-flight calls get `grace` seconds, then are cancelled."""
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        self.metrics.close()


class StartedService(Protocol):
    """What `serve_until_signal` drives: a server that serves from `start()` and finishes
    `loaded` (its model, its ranks) in the background."""

    loaded: asyncio.Future | None

    async def start(self) -> int: ...

    async def stop(self, drain_s: float) -> None: ...


async def serve_until_signal(
    server: StartedService, listen: str, drain_s: float, loading: str
) -> int:
    """Start `server` and serve until SIGTERM/SIGINT or a failed load; drain for up to `drain_s`
    and stop. Returns the exit status (1 when loading failed). `loading` says what loads."""
    port = await server.start()
    log.info("listening on %s (port %d); %s", listen, port, loading)
    stopping = asyncio.ensure_future(wait_for_signal())
    assert server.loaded is not None
    await asyncio.wait({stopping, server.loaded}, return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if server.loaded.done() and not server.loaded.cancelled() and server.loaded.exception():
        error = server.loaded.exception()
        log.error("%s failed: %s: %s", loading, type(error).__name__, error)
        status = 1
    else:
        await stopping
    log.info("stopping: draining in-flight requests for up to %.1f s", drain_s)
    await server.stop(drain_s)
    stopping.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await stopping
    log.info("stopped")
    return status


async def wait_for_signal() -> None:
    """Return on the first SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
