"""The prefill service's server: `bagel.v1.Prefill` on the shared server shape
(`serving.server.GrpcServer`: health, reflection, metrics), the KV source loaded in the background,
health SERVING only while the source is loaded and the diffusion service (one of them, with several:
`routing.DiffusionRouter`) is SERVING, and a graceful stop on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import torch

from prefill_service.metrics import PrefillMetrics
from prefill_service.prefill import KVSource
from prefill_service.relay import DiffusionLink
from prefill_service.routing import DiffusionRouter
from prefill_service.servicer import PrefillServicer, prefill_handler
from prefill_service.settings import PrefillSettings
from protos import PREFILL_SERVICE
from serving.access import RefusalLog
from serving.credentials import ClientCredentialStore, CredentialReloader, ServerCredentialStore
from serving.security import SecurityError, is_loopback, risky_settings
from serving.server import GrpcServer, serve_until_signal

log = logging.getLogger(__name__)


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
            settings.diffusion_security, on_tls_change=self._reopen_links
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
        self.servicer = PrefillServicer(
            self.router,
            self.metrics,
            chunk_size=settings.chunk_size,
            max_prompt_tokens=settings.max_prompt_tokens,
        )
        self.grpc = GrpcServer(
            PREFILL_SERVICE,
            settings.listen,
            lambda server: server.add_generic_rpc_handlers((prefill_handler(self.servicer),)),
            self.metrics,
            settings.metrics_host,
            settings.metrics_port,
            credentials=credentials.server_credentials(),
            interceptors=credentials.interceptors(RefusalLog(self.metrics.auth_failures)),
        )
        self.loaded: asyncio.Future | None = None

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
        least one, with several), asked every second, says SERVING."""
        await self.grpc.set_serving(self.servicer.source is not None and self.router.serving)

    async def _load(self) -> None:
        started = time.perf_counter()
        source = await asyncio.get_running_loop().run_in_executor(None, self._load_source)
        self.metrics.model_load_seconds.set(time.perf_counter() - started)
        watch_peak_memory(self.metrics)
        self.servicer.source = source
        await self.router.check_health()
        await self._publish_health()
        log.info(
            "serving: model %s, KV dtype %s, diffusion service at %s",
            source.config.fingerprint(),
            source.dtype,
            ", ".join(self.router.addresses),
        )

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING at once; in-flight calls get `grace` seconds, then are cancelled."""
        self.reloader.stop()
        if self.loaded is not None and not self.loaded.done():
            self.loaded.cancel()
        await self.grpc.stop(grace)
        self.router.close()

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
