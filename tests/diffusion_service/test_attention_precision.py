"""`--attention-precision`: parsed once into the settings, reported in GetModelInfo, and served
on one rank as the in-process pipeline with the same setting computes it."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch

from bagel.pipeline import Pipeline
from diffusion_service.server import precision_name
from diffusion_service.settings import parse_settings
from protos import DiffusionStub, ModelInfoRequest
from serving.params import GenerationParams
from tests.diffusion_service.kv_stream import generate, kv_frames, latents_of
from tests.helpers.processes import ServiceProcess

PARAMS = GenerationParams(height=48, width=80, num_timesteps=8, seed=5)


def test_attention_precision_defaults_to_bf16_and_parses_fp8():
    assert parse_settings(["--model", "m"]).attention_precision == "bf16"
    settings = parse_settings(["--model", "m", "--attention-precision", "fp8"])
    assert settings.attention_precision == "fp8"


def test_a_bad_attention_precision_ends_with_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exited:
        parse_settings(["--model", "m", "--attention-precision", "fp16"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--attention-precision" in err and "'fp16'" in err, err


def test_the_precision_name_says_fp8_attention_beside_fp8_linears():
    model = ["--model", "m"]
    assert precision_name(parse_settings(model)) == "fp32"
    assert precision_name(parse_settings([*model, "--attention-precision", "fp8"])) == (
        "fp32 + fp8 attention"
    )
    both = parse_settings([*model, "--attention-precision", "fp8", "--linear-precision", "fp8"])
    assert precision_name(both) == "fp32 + fp8 linears + fp8 attention"


@pytest.mark.slow  # a service start; FP8 attention under every layout runs in make test (parallel/test_fp8_attention_sp.py)
def test_fp8_attention_served_on_one_rank_equals_the_pipeline_with_fp8_attention(
    tiny_model_dir: Path,
):
    fp8 = Pipeline(tiny_model_dir, "cpu", attention_precision="fp8")
    contexts = fp8.prefill("a red circle", negative_prompt="blurry")
    expected = fp8.denoise(contexts, PARAMS)
    args = ["--model", str(tiny_model_dir), "--attention-precision", "fp8"]
    with ServiceProcess("diffusion_service", args) as svc:
        svc.wait_serving()
        frames = kv_frames(contexts, fp8.config.fingerprint(), PARAMS, latents_only=True)
        latents = latents_of(generate(svc.address, frames))
        with grpc.insecure_channel(svc.address) as channel:
            info = DiffusionStub(channel).GetModelInfo(ModelInfoRequest(), timeout=10)
        log = svc.log()
    assert ((latents - expected).abs().max() / expected.abs().max()).item() < 1e-5
    exact = Pipeline(tiny_model_dir, "cpu").denoise(contexts, PARAMS)
    assert not torch.allclose(latents, exact, rtol=0, atol=1e-4)  # FP8 attention did run
    assert info.precision == "fp32 + fp8 attention"
    assert "fp8 attention on the CPU: no Triton FP8 attention kernel" in log
