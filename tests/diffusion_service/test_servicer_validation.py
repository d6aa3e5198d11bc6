"""The diffusion servicer checks a request's parameters (its cache default filled in) with
`serving.params.validate` exactly once, and a bad value of each kind ends as INVALID_ARGUMENT
naming its field, before the job is queued."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

import diffusion_service.servicer as servicer_module
from bagel.network.config import BagelConfig
from bagel.pipeline import Pipeline
from diffusion_service.metrics import DiffusionMetrics
from diffusion_service.servicer import DiffusionServicer
from diffusion_service.settings import ServiceSettings
from serving.params import DBCache, GenerationParams, TeaCache
from tests.diffusion_service.kv_stream import kv_frames
from tests.helpers.servicer_calls import Aborted, CallerContext, QueueOnlyEngine, stream_of

SMALL = {"height": 32, "width": 32, "num_timesteps": 4, "seed": 1}


@pytest.fixture(scope="module")
def contexts(tiny_model_dir: Path):
    return Pipeline(tiny_model_dir, "cpu").prefill("a red circle")


@pytest.fixture
def calls(monkeypatch) -> list[GenerationParams]:
    """Every `validate` call the servicer makes, by its params."""
    seen: list[GenerationParams] = []
    real = servicer_module.validate

    def counting(params, limits):
        seen.append(params)
        real(params, limits)

    monkeypatch.setattr(servicer_module, "validate", counting)
    return seen


def _first_event(model_dir, contexts, params: GenerationParams, **settings):
    """(the first event's kind or None, the abort status or None, the queued jobs)."""
    config = BagelConfig.from_dir(model_dir)
    engine = QueueOnlyEngine()
    servicer = DiffusionServicer(
        ServiceSettings(str(model_dir), **settings), config, engine, DiffusionMetrics()
    )
    context = CallerContext()
    frames = kv_frames(contexts, config.fingerprint(), params, request_id="r-1")

    async def run():
        stream = servicer.generate(stream_of(frames), context)
        try:
            first = await stream.__anext__()
        except Aborted:
            return None
        await stream.aclose()
        return first.WhichOneof("event")

    return asyncio.run(run()), context.status, engine.handles


def test_a_good_request_is_validated_once_with_the_cache_default_filled_in(
    tiny_model_dir, contexts, calls
):
    params = GenerationParams(**SMALL)
    event, status, handles = _first_event(
        tiny_model_dir, contexts, params, default_cache=TeaCache()
    )
    assert (event, status) == ("accepted", None)
    assert calls == [GenerationParams(**SMALL, cache=TeaCache())]
    assert [h.spec.params for h in handles] == calls


@pytest.mark.parametrize(
    ("params", "named"),
    [
        (GenerationParams(height=1000, width=32), "height=1000 must be a positive multiple of 16"),
        (GenerationParams(width=2048, height=32), "width=2048 must be a positive multiple of 16"),
        (GenerationParams(**{**SMALL, "num_timesteps": 1}), "num_timesteps=1"),
        (GenerationParams(cfg_interval=(0.8, 0.2), **SMALL), "cfg_interval=(0.8, 0.2)"),
        (
            GenerationParams(cache=DBCache(fn_compute_blocks=3, bn_compute_blocks=1), **SMALL),
            "cache.fn_compute_blocks + cache.bn_compute_blocks = 4 leaves none",
        ),
    ],
    ids=["height", "width", "range", "interval", "cache_fits"],
)
def test_a_bad_value_is_invalid_argument_naming_its_field_and_queues_nothing(
    tiny_model_dir, contexts, calls, params, named
):
    event, status, handles = _first_event(tiny_model_dir, contexts, params)
    assert event is None and handles == []
    code, message = status
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert named in message
    assert len(calls) == 1
