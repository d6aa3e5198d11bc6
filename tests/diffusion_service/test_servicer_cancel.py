"""A caller that goes away while the diffusion servicer waits at a `yield` (gRPC closes the
generator: GeneratorExit, not CancelledError) is logged and counted as CANCELLED, never as OK,
and its job is cancelled."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from bagel.network.config import BagelConfig
from bagel.pipeline import Pipeline
from diffusion_service.metrics import DiffusionMetrics
from diffusion_service.servicer import DiffusionServicer
from diffusion_service.settings import ServiceSettings
from serving.params import GenerationParams
from tests.diffusion_service.kv_stream import kv_frames
from tests.helpers.servicer_calls import CallerContext, QueueOnlyEngine, stream_of

PARAMS = GenerationParams(height=32, width=32, num_timesteps=4, seed=1)


@pytest.fixture(scope="module")
def contexts(tiny_model_dir: Path):
    return Pipeline(tiny_model_dir, "cpu").prefill("a red circle")


def test_a_generator_closed_at_a_yield_is_logged_and_counted_as_cancelled(
    tiny_model_dir, contexts, caplog
):
    config = BagelConfig.from_dir(tiny_model_dir)
    metrics = DiffusionMetrics()
    engine = QueueOnlyEngine()
    servicer = DiffusionServicer(ServiceSettings(str(tiny_model_dir)), config, engine, metrics)

    async def call_and_leave() -> str:
        stream = servicer.generate(
            stream_of(kv_frames(contexts, config.fingerprint(), PARAMS, request_id="leaver")),
            CallerContext(),
        )
        first = await stream.__anext__()
        await stream.aclose()  # what gRPC does when the caller cancels while we wait at `yield`
        return first.WhichOneof("event")

    with caplog.at_level(logging.INFO, logger="diffusion_service.servicer"):
        assert asyncio.run(call_and_leave()) == "accepted"
    assert "request leaver: ended by the client: CANCELLED" in caplog.text
    [handle] = engine.handles
    assert not handle.keep_going()  # the job is told to stop
    counted = {
        sample.labels["code"]: sample.value
        for sample in metrics.requests.collect()[0].samples
        if sample.name.endswith("_total")
    }
    assert counted.get("CANCELLED") == 1 and not counted.get("OK")
