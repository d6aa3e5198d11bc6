"""Fixtures for the prefill service tests: a background event loop, the fake diffusion service,
and in-process prefill servers (real gRPC on 127.0.0.1) over the tiny checkpoint."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bagel.network.config import BagelConfig
from prefill_service.prefill import KVSource, LanguageModelKV, LayerKV, PlannedKV
from prefill_service.server import PrefillServer
from prefill_service.settings import PrefillSettings
from serving.params import GenerationParams
from tests.helpers.event_loop import EventLoopThread
from tests.helpers.ranks import free_port
from tests.prefill_service.fake_diffusion import FakeDiffusion


class InstrumentedSource:
    """Wraps a KVSource: calls `before_layer(index)` on the producer thread just before each layer
    is computed and records when each layer finished computing."""

    def __init__(self, inner: KVSource) -> None:
        self.inner = inner
        self.config = inner.config
        self.dtype = inner.dtype
        self.before_layer: Callable[[int], None] | None = None
        self.layer_done_times: list[float] = []

    def reset(self) -> None:
        self.before_layer = None
        self.layer_done_times = []

    def plan(
        self, prompt: str, params: GenerationParams, think_plan: str | None = None
    ) -> PlannedKV:
        planned = self.inner.plan(prompt, params, think_plan)
        return PlannedKV(planned.contexts, lambda: self._observed(planned.compute()))

    @property
    def supports_edits(self) -> bool:
        return bool(getattr(self.inner, "supports_edits", False))

    def edit_size(self, image):
        return self.inner.edit_size(image)

    def plan_edit(
        self, prompt: str, params: GenerationParams, image, think_plan: str | None = None
    ) -> PlannedKV:
        planned = self.inner.plan_edit(prompt, params, image, think_plan)
        return dataclasses.replace(planned, compute=lambda: self._observed(planned.compute()))

    def _observed(self, layers: Iterator[LayerKV]) -> Iterator[LayerKV]:
        index = 0
        while True:
            if self.before_layer is not None:
                self.before_layer(index)
            pairs = next(layers, None)
            if pairs is None:
                return
            self.layer_done_times.append(time.perf_counter())
            yield pairs
            index += 1


class RunningPrefill:
    """An in-process PrefillServer on the test loop."""

    def __init__(self, loop_thread: EventLoopThread, settings: PrefillSettings, source) -> None:
        self.loop_thread = loop_thread
        self.server = PrefillServer(settings, lambda: source)
        port = loop_thread.run(self.server.start())
        self.address = f"127.0.0.1:{port}"
        loop_thread.run(_wait(self.server.loaded))

    def stop(self, grace: float | None = 1.0) -> None:
        self.loop_thread.run(self.server.stop(grace))


async def _wait(future) -> None:
    await future


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[EventLoopThread]:
    thread = EventLoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="session")
def tiny_config(tiny_model_dir: Path) -> BagelConfig:
    return BagelConfig.from_dir(tiny_model_dir)


@pytest.fixture(scope="session")
def fake_diffusion_server(loop_thread: EventLoopThread, tiny_config: BagelConfig):
    fake = FakeDiffusion(tiny_config)
    loop_thread.run(fake.start())
    yield fake
    loop_thread.run(fake.stop())


@pytest.fixture
def fake_diffusion(fake_diffusion_server: FakeDiffusion) -> FakeDiffusion:
    fake_diffusion_server.reset()
    return fake_diffusion_server


@pytest.fixture(scope="session")
def lm_source_session(tiny_model_dir: Path) -> InstrumentedSource:
    return InstrumentedSource(LanguageModelKV(tiny_model_dir, "cpu"))


@pytest.fixture
def lm_source(lm_source_session: InstrumentedSource) -> InstrumentedSource:
    """The tiny model's source, with no hook and no recorded layers."""
    lm_source_session.reset()
    return lm_source_session


@pytest.fixture(scope="session")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def prefill_server(
    loop_thread: EventLoopThread,
    tiny_model_dir: Path,
    fake_diffusion_server: FakeDiffusion,
    lm_source_session: InstrumentedSource,
    metrics_port: int,
) -> Iterator[RunningPrefill]:
    settings = PrefillSettings(
        model_dir=str(tiny_model_dir),
        listen="127.0.0.1:0",
        diffusion=fake_diffusion_server.address,
        metrics_port=metrics_port,
        max_prompt_tokens=256,
        chunk_size=512,  # several chunks per tensor, and many frames in flight
    )
    running = RunningPrefill(loop_thread, settings, lm_source_session)
    yield running
    running.stop()


@pytest.fixture
def prefill(prefill_server: RunningPrefill, lm_source: InstrumentedSource) -> RunningPrefill:
    """The shared in-process prefill server (its source freshly reset)."""
    return prefill_server
