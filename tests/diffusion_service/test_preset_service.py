"""`--preset` through the service as a real process: `exact` serves what the defaults serve, bit
for bit, and `fast` on the CPU serves the FP8 linears' result, says so in GetModelInfo, and logs
its resolved settings and that the FP8 linears run the reference here."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch

from bagel.pipeline import Pipeline
from protos import DiffusionStub, ModelInfoRequest
from serving.params import GenerationParams
from tests.diffusion_service.kv_stream import generate, kv_frames, latents_of
from tests.helpers.processes import ServiceProcess

PARAMS = GenerationParams(height=48, width=80, num_timesteps=8, seed=5)


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir: Path) -> Pipeline:
    return Pipeline(tiny_model_dir, "cpu")


@pytest.fixture(scope="module")
def contexts(pipeline):
    return pipeline.prefill("a red circle", negative_prompt="blurry")


def served(svc: ServiceProcess, contexts, fingerprint: str) -> tuple[torch.Tensor, bytes]:
    latents = latents_of(
        generate(svc.address, kv_frames(contexts, fingerprint, PARAMS, latents_only=True))
    )
    png = generate(svc.address, kv_frames(contexts, fingerprint, PARAMS))[-1].image.png
    return latents, png


def model_info(svc: ServiceProcess):
    with grpc.insecure_channel(svc.address) as channel:
        return DiffusionStub(channel).GetModelInfo(ModelInfoRequest(), timeout=10)


@pytest.mark.slow  # two service starts; the preset table is unit-tested in test_presets.py
def test_preset_exact_serves_what_the_defaults_serve_bit_for_bit(
    tiny_model_dir, pipeline, contexts
):
    fingerprint = pipeline.config.fingerprint()
    model = ["--model", str(tiny_model_dir)]
    with (
        ServiceProcess("diffusion_service", model) as default,
        ServiceProcess("diffusion_service", [*model, "--preset", "exact"]) as exact,
    ):
        default.wait_serving()
        exact.wait_serving()
        default_latents, default_png = served(default, contexts, fingerprint)
        exact_latents, exact_png = served(exact, contexts, fingerprint)
        assert model_info(exact) == model_info(default)
    assert torch.equal(exact_latents, default_latents)
    assert exact_png == default_png
    expected = pipeline.denoise(contexts, PARAMS)
    assert ((exact_latents - expected).abs().max() / expected.abs().max()).item() < 1e-5
    assert "preset exact: ulysses 1, ring 1, cfg 1" in exact.log()


@pytest.mark.slow  # a service start; the preset table is unit-tested in test_presets.py
def test_preset_fast_on_the_cpu_serves_the_fp8_linears_result_and_says_so(
    tiny_model_dir, pipeline, contexts
):
    fp8 = Pipeline(tiny_model_dir, "cpu", linear_precision="fp8")
    expected = fp8.denoise(contexts, PARAMS)
    with ServiceProcess(
        "diffusion_service", ["--model", str(tiny_model_dir), "--preset", "fast"]
    ) as fast:
        fast.wait_serving()
        latents, _ = served(fast, contexts, pipeline.config.fingerprint())
        info = model_info(fast)
    assert ((latents - expected).abs().max() / expected.abs().max()).item() < 1e-5
    bf16 = pipeline.denoise(contexts, PARAMS)
    assert not torch.allclose(latents, bf16, rtol=0, atol=1e-4)  # FP8 did run
    assert info.precision == "fp32 + fp8 linears"
    assert info.layout.startswith("1 rank(s): ulysses 1, ring 1, cfg 1")
    log = fast.log()
    assert "preset fast: ulysses 1, ring 1, cfg 1" in log and "fp32 + fp8 linears" in log
    assert "fp8 linears on the CPU: no FP8 tensor cores" in log
