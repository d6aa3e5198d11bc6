"""Think + generate through both services (real processes on 127.0.0.1) on 1 rank, Ulysses 2,
Ring 2 and CFG-parallel 2: the plan and the final latents equal the in-process `Pipeline`'s
(fp32 CPU, tiny checkpoint) within 1e-5."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from bagel.pipeline import Pipeline
from bagel.text.decoding import Sampling
from client import build_request
from protos import OutputFormat, PrefillStub
from serving.params import GenerationParams
from tests.helpers.processes import ServiceProcess

SMALL = {"height": 48, "width": 80, "num_timesteps": 6}
PLAN_TOKENS = 12
LAYOUTS = {
    "1 rank": [],
    "U2": ["--ulysses", "2"],
    "R2": ["--ring", "2"],
    "CFG2": ["--cfg-parallel", "2"],
}
QUICK = {"1 rank"}  # the other layouts are `slow` variants: make test-all runs them


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir: Path) -> Pipeline:
    return Pipeline(tiny_model_dir, "cpu")


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(name, marks=() if name in QUICK else pytest.mark.slow) for name in LAYOUTS
    ],
)
def services(request, tiny_model_dir: Path):
    diffusion_args = ["--model", str(tiny_model_dir), *LAYOUTS[request.param]]
    with ServiceProcess("diffusion_service", diffusion_args) as diffusion:
        diffusion.wait_serving()
        args = ["--model", str(tiny_model_dir), "--diffusion", diffusion.address]
        with ServiceProcess("prefill_service", args) as prefill:
            yield prefill.wait_serving()


def test_think_latents_through_both_services_equal_the_pipeline_within_1e_5(services, pipeline):
    prompt, seed = "a red circle on a white background", 7
    request = build_request(
        prompt, think=True, think_max_new_tokens=PLAN_TOKENS, seed=seed, **SMALL
    )
    request.params.output_format = OutputFormat.OUTPUT_FORMAT_LATENTS
    with grpc.insecure_channel(services.address) as channel:
        events = list(PrefillStub(channel).Generate(request, timeout=120))
    plan = "".join(e.thinking.text for e in events if e.WhichOneof("event") == "thinking")
    [latents] = [e.latents for e in events if e.WhichOneof("event") == "latents"]
    got = torch.from_numpy(
        np.frombuffer(latents.data, dtype="<f4").reshape(tuple(latents.shape)).copy()
    )

    expected_plan = pipeline.plan(prompt, Sampling(PLAN_TOKENS))
    assert plan == expected_plan
    params = GenerationParams(seed=seed, **SMALL)
    want = pipeline.denoise(pipeline.think_contexts(prompt, expected_plan), params)
    assert got.shape == want.shape
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5
