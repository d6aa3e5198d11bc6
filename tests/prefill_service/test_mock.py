"""The mock prefill: synthetic KV that is deterministic in (prompt, seed) with the model's shapes,
sent through the same Prefill API; and the mock and the CLI as real processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bagel.network.kv import Branch, ContextKV
from bagel.pipeline import Pipeline
from client import BagelClient, build_request
from prefill_service.mock import SyntheticKV, synthetic_contexts, synthetic_token_count
from prefill_service.settings import PrefillSettings
from protos import kv_pb2
from serving.params import GenerationParams, RequestLimits, validate
from tests.helpers.processes import ROOT, ServiceProcess
from tests.prefill_service.conftest import RunningPrefill

SMALL = {"height": 64, "width": 64}


def options(config, **params) -> GenerationParams:
    parsed = GenerationParams.from_proto(build_request("unused", **params).params)
    limits = RequestLimits(
        pixel_step=config.pixels_per_token,
        max_side=config.max_image_size,
        num_layers=config.llm.num_layers,
    )
    validate(parsed, limits)
    return parsed


def assert_same_kv(a, b) -> None:
    assert list(a) == list(b)
    for kind in a:
        assert a[kind].next_rope_position == b[kind].next_rope_position
        for x, y in zip(a[kind].keys + a[kind].values, b[kind].keys + b[kind].values, strict=True):
            assert torch.equal(x, y)


def differs(a, b) -> bool:
    return not torch.equal(a[Branch.COND].keys[0], b[Branch.COND].keys[0])


def test_same_prompt_and_seed_give_identical_kv(tiny_config):
    first = synthetic_contexts(tiny_config, "A cute cat", options(tiny_config, seed=52))
    again = synthetic_contexts(tiny_config, "A cute cat", options(tiny_config, seed=52))
    assert_same_kv(first, again)


def test_different_seed_or_prompt_gives_different_kv(tiny_config):
    base = synthetic_contexts(tiny_config, "A cute cat", options(tiny_config, seed=52))
    other_seed = synthetic_contexts(tiny_config, "A cute cat", options(tiny_config, seed=53))
    other_prompt = synthetic_contexts(tiny_config, "A cute dog", options(tiny_config, seed=52))
    assert differs(base, other_seed) and differs(base, other_prompt)


def test_kv_has_the_model_shapes_and_a_realistic_scale(tiny_config):
    llm = tiny_config.llm
    prompt, negative = "A lighthouse on a rocky coast at sunset", "blurry"
    contexts = synthetic_contexts(
        tiny_config, prompt, options(tiny_config, seed=1, negative_prompt=negative)
    )
    assert list(contexts) == [Branch.COND, Branch.UNCOND_TEXT]
    for kind, text in ((Branch.COND, prompt), (Branch.UNCOND_TEXT, negative)):
        ctx = contexts[kind]
        tokens = synthetic_token_count(text)
        assert ctx.next_rope_position == tokens == 2 + -(-len(text.encode()) // 4)
        assert len(ctx.keys) == len(ctx.values) == llm.num_layers
        for t in ctx.keys + ctx.values:
            assert t.shape == (tokens, llm.num_kv_heads, llm.head_dim)
            assert t.dtype == torch.float32
    keys = torch.cat([k.flatten() for k in contexts[Branch.COND].keys])
    values = torch.cat([v.flatten() for v in contexts[Branch.COND].values])
    assert 0.9 < keys.std() < 1.1 and 0.4 < values.std() < 0.6


def test_empty_negative_prompt_gives_an_empty_uncond_context(tiny_config):
    contexts = synthetic_contexts(tiny_config, "A cat", options(tiny_config, seed=1))
    assert contexts[Branch.UNCOND_TEXT].num_tokens == 0
    assert contexts[Branch.UNCOND_TEXT].next_rope_position == 0


def test_synthetic_kv_feeds_the_in_process_pipeline(tiny_model_dir, tiny_config):
    opts = options(tiny_config, seed=4, num_timesteps=3, **SMALL)
    latents = Pipeline(tiny_model_dir).denoise(
        synthetic_contexts(tiny_config, "A cute cat", opts), opts
    )
    assert latents.shape == (16, tiny_config.patch_dim) and torch.isfinite(latents).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mock_service_sends_exactly_synthetic_contexts(
    loop_thread, tiny_model_dir, tiny_config, fake_diffusion, dtype
):
    settings = PrefillSettings(
        model_dir=str(tiny_model_dir), listen="127.0.0.1:0", diffusion=fake_diffusion.address
    )
    running = RunningPrefill(loop_thread, settings, SyntheticKV(tiny_model_dir, dtype))
    params = {"seed": 11, "negative_prompt": "low quality", **SMALL}
    try:
        with BagelClient(running.address, timeout=30) as client:
            result = client.generate("A cute cat", **params)
    finally:
        running.stop()
    assert result.seed == 11
    [call] = fake_diffusion.calls
    assert call.header.dtype == (kv_pb2.DTYPE_FP32 if dtype == torch.float32 else kv_pb2.DTYPE_BF16)
    expected = synthetic_contexts(tiny_config, "A cute cat", options(tiny_config, **params), dtype)
    got = {
        Branch(c.kind): ContextKV(c.keys, c.values, c.next_rope_position)
        for c in call.received.cache.contexts
    }
    assert_same_kv(got, expected)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "client", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_mock_process_and_client_cli_end_to_end(tiny_model_dir, fake_diffusion, tmp_path: Path):
    fake_diffusion.reset(steps=4)
    args = ["--model", str(tiny_model_dir), "--diffusion", fake_diffusion.address]
    with ServiceProcess("prefill_service.mock", args) as service:
        service.wait_serving()
        health = run_cli("health", "--server", service.address)
        assert health.returncode == 0 and health.stdout.strip() == "SERVING"
        out = tmp_path / "cat.png"
        gen = run_cli(
            "generate", "A cute cat", "-o", str(out), "--size", "64", "--seed", "52",
            "--steps", "5", "--server", service.address, "--timeout", "30",
        )  # fmt: skip
        assert gen.returncode == 0, gen.stderr
        assert service.stop() == 0
    steps = [line for line in gen.stderr.splitlines() if line.startswith("step ")]
    assert steps == ["step 1/4", "step 2/4", "step 3/4", "step 4/4"]  # the fake runs 4 steps
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in gen.stdout and "seed 52" in gen.stdout
    assert "prefill" in gen.stdout and "kv_send" in gen.stdout
    header = fake_diffusion.calls[0].header
    assert header.params.num_timesteps == 5 and header.params.width == 64
    down = run_cli("health", "--server", service.address, "--timeout", "2")
    assert down.returncode != 0 and down.stderr.startswith("error: UNAVAILABLE: ")
