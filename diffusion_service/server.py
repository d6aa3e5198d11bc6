"""Start-up and shutdown of the diffusion service: ranks, engine, gRPC server with health and
reflection, metrics, and signal handling."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bagel.checkpoint import load_autoencoder
from bagel.pipeline import default_dtype
from diffusion_service.engine import Engine
from diffusion_service.metrics import ServiceMetrics
from diffusion_service.ranks import rank_device, validate_settings
from diffusion_service.servicer import DiffusionServicer
from diffusion_service.settings import ServiceSettings
from diffusion_service.world import RankWorld
from protos import DIFFUSION_SERVICE
from protos.options import server_options
from transport.buffers import tune_malloc
from transport.rpc import diffusion_handler

log = logging.getLogger("diffusion_service")


def run(settings: ServiceSettings) -> None:
    config = validate_settings(settings)  # a bad topology fails here, before any process starts
    tune_malloc()  # ~1 MiB frames otherwise make glibc return and re-fault pages all the time
    world = RankWorld(settings)  # forks the rank launcher: before any thread exists
    try:
        asyncio.run(_serve(settings, config, world))
    finally:
        if world.launcher is not None:
            world.launcher.close()


async def _serve(settings: ServiceSettings, config, world: RankWorld) -> None:
    loop = asyncio.get_running_loop()
    health_servicer = health.aio.HealthServicer()
    metrics = ServiceMetrics.create()
    if settings.metrics_port is not None:
        metrics.serve(settings.metrics_host, settings.metrics_port)

    async def set_health(serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", DIFFUSION_SERVICE):
            await health_servicer.set(name, status)

    def on_health(serving: bool) -> None:  # called from the engine thread
        asyncio.run_coroutine_threadsafe(set_health(serving), loop)

    await set_health(False)
    server = grpc.aio.server(options=server_options())
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (DIFFUSION_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(settings.listen)
    if port == 0:
        raise SystemExit(f"cannot listen on {settings.listen}")
    await server.start()  # health answers NOT_SERVING while the ranks start

    await asyncio.to_thread(world.start)
    device = rank_device(settings, 0)
    autoencoder = load_autoencoder(settings.model_dir, default_dtype(device), device)
    engine = Engine(settings, config, world, autoencoder, metrics, on_health)
    servicer = DiffusionServicer(settings, config, engine, metrics)
    server.add_generic_rpc_handlers((diffusion_handler(servicer.generate),))
    engine.start()
    await set_health(True)
    host = settings.listen.rsplit(":", 1)[0]
    log.info(
        "diffusion service listening on %s:%d (%s, %s)",
        host,
        port,
        settings.parallel.describe(),
        settings.device,
    )

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining for up to %.0f s", settings.drain_s)
    await set_health(False)
    await asyncio.to_thread(engine.stop, settings.drain_s)
    await server.stop(grace=1.0)
    log.info("stopped")
