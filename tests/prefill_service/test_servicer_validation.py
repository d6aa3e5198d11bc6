"""The prefill servicer checks a request's parameters with `serving.params.validate` exactly once,
think requests included (their plan is decoded between the checks and the prefill), and a bad
value of each kind ends as INVALID_ARGUMENT naming its field, before any compute."""

from __future__ import annotations

import asyncio

import grpc
import pytest

import prefill_service.servicer as servicer_module
from prefill_service.kv_worker import KVWorker
from prefill_service.metrics import PrefillMetrics
from prefill_service.mock import SyntheticKV
from prefill_service.servicer import PrefillServicer
from prefill_service.text import Answer, Queued
from protos import GenerateRequest
from serving.errors import ServiceError
from serving.params import DBCache, GenerationParams
from tests.helpers.servicer_calls import Aborted, CallerContext

SMALL = {"height": 32, "width": 32, "num_timesteps": 4}


class NoDiffusion:
    """A router with no diffusion group: a request that passed every check ends here."""

    groups = ()

    async def lease(self, time_remaining):
        raise ServiceError(grpc.StatusCode.UNAVAILABLE, "no diffusion service (test)")


class ThinkingSyntheticKV(SyntheticKV):
    """The mock source, taking a think request's plan (and ignoring it)."""

    def plan(self, prompt, params, think_plan=None):
        return super().plan(prompt, params)


class PlanText:
    """A text side that plans and decodes a think request's plan without a model."""

    def plan_request(self, source, prompt, sampling_msg, image):
        return prompt

    async def decode(self, source, request):
        yield Queued(0)
        yield "a plan"
        yield Answer("a plan", "stop", 3, 2, prefill_s=0.0, decode_s=0.0)


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


def _generate(model_dir, request: GenerateRequest) -> tuple[grpc.StatusCode, str, list[str]]:
    worker = KVWorker()
    servicer = PrefillServicer(NoDiffusion(), PrefillMetrics(), worker=worker, text=PlanText())
    servicer.source = ThinkingSyntheticKV(model_dir)
    context = CallerContext()

    async def run() -> list[str]:
        events = []
        try:
            async for event in servicer.Generate(request, context):
                events.append(event.WhichOneof("event"))
        except Aborted:
            pass
        return events

    try:
        events = asyncio.run(run())
    finally:
        worker.close()
    assert context.status is not None
    return (*context.status, events)


@pytest.mark.parametrize("think", [False, True], ids=["plain", "think"])
def test_a_good_request_is_validated_once(tiny_model_dir, calls, think):
    params = GenerationParams(seed=1, **SMALL)
    request = GenerateRequest(
        prompt="a red circle", params=params.to_proto(), request_id="ok-1", think=think
    )
    code, message, events = _generate(tiny_model_dir, request)
    # Past every check: it fails only where it asks for a diffusion service.
    assert (code, message) == (grpc.StatusCode.UNAVAILABLE, "no diffusion service (test)")
    assert events == (["thinking"] if think else [])
    assert calls == [params]


@pytest.mark.parametrize(
    ("params", "named"),
    [
        (GenerationParams(height=1000, width=32), "height=1000 must be a positive multiple of 16"),
        (GenerationParams(width=2048, height=32), "width=2048 must be a positive multiple of 16"),
        (GenerationParams(cfg_renorm_min=1.5, **SMALL), "cfg_renorm_min=1.5"),
        (GenerationParams(cfg_interval=(0.8, 0.2), **SMALL), "cfg_interval=(0.8, 0.2)"),
        (
            GenerationParams(cache=DBCache(fn_compute_blocks=3, bn_compute_blocks=1), **SMALL),
            "cache.fn_compute_blocks + cache.bn_compute_blocks = 4 leaves none",
        ),
    ],
    ids=["height", "width", "range", "interval", "cache_fits"],
)
@pytest.mark.parametrize("think", [False, True], ids=["plain", "think"])
def test_a_bad_value_is_invalid_argument_naming_its_field_before_any_compute(
    tiny_model_dir, calls, params, named, think
):
    request = GenerateRequest(
        prompt="a red circle", params=params.to_proto(), request_id="bad-1", think=think
    )
    code, message, events = _generate(tiny_model_dir, request)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert named in message
    assert events == []  # a think request's plan is not decoded either
    assert len(calls) == 1
