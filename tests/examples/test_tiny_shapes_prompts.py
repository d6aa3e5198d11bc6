"""The trained tiny checkpoint draws what it is asked, through both real services: 12 prompts
(every colour, every shape at least twice, both backgrounds), 20 timesteps, at least 11 pass the
pixel check. The random tiny checkpoint, through the same path, does not."""

from __future__ import annotations

from pathlib import Path

import pytest

from client import BagelClient
from examples.tiny_shapes.check import EVAL_PROMPTS, Verdict, check_prompt
from tests.helpers.processes import ROOT, ServiceProcess

TRAINED = ROOT / "examples" / "tiny_shapes" / "checkpoint"
TIMESTEPS = 20
REQUIRED = 11


def verdicts_through_services(model_dir: Path) -> list[tuple[str, Verdict]]:
    """Start the diffusion and prefill services on `model_dir`, generate every eval prompt at
    128x128 through the client, and check each image."""
    with ServiceProcess("diffusion_service", ["--model", str(model_dir)]) as diffusion:
        diffusion.wait_serving()
        args = ["--model", str(model_dir), "--diffusion", diffusion.address]
        with ServiceProcess("prefill_service", args) as prefill:
            prefill.wait_serving()
            results = []
            with BagelClient(prefill.address, timeout=120) as client:
                for prompt in EVAL_PROMPTS:
                    result = client.generate(
                        prompt.text,
                        height=128,
                        width=128,
                        num_timesteps=TIMESTEPS,
                        seed=prompt.seed,
                    )
                    assert result.image.size == (128, 128)
                    results.append((prompt.text, check_prompt(result.image, prompt)))
    return results


@pytest.mark.slow
@pytest.mark.skipif(
    not (TRAINED / "ema.safetensors").is_file(),
    reason=f"no trained checkpoint at {TRAINED} yet: train it on a GPU with "
    "`python -m examples.tiny_shapes.train --out examples/tiny_shapes/checkpoint --device cuda "
    "--seed 0` and commit it",
)
def test_trained_checkpoint_draws_at_least_11_of_12_prompts_through_both_services():
    results = verdicts_through_services(TRAINED)
    failed = [(text, verdict) for text, verdict in results if not verdict.passed]
    assert len(results) - len(failed) >= REQUIRED, failed


@pytest.mark.slow
def test_random_tiny_checkpoint_fails_the_same_check_through_both_services(tiny_model_dir):
    results = verdicts_through_services(tiny_model_dir)
    passed = sum(verdict.passed for _, verdict in results)
    assert passed < REQUIRED, results
