"""The trained tiny checkpoint edits as asked, through both real services: the 12 edit
instructions of `check.EDIT_EVAL_PROMPTS` (four recolours, four reshapes, four new backgrounds),
each on its rendered source image, 20 timesteps with the service's editing defaults, at least 11
right by `check_edit`. The random tiny checkpoint, through the same path, is not."""

from __future__ import annotations

from pathlib import Path

import pytest

from client import BagelClient
from examples.tiny_shapes.check import EDIT_EVAL_PROMPTS, EditVerdict, check_edit
from examples.tiny_shapes.edit_inputs import PREFILL_EDIT_FLAGS
from tests.helpers.processes import ROOT, ServiceProcess

TRAINED = ROOT / "examples" / "tiny_shapes" / "checkpoint"
TIMESTEPS = 20
REQUIRED = 11


def edit_verdicts_through_services(model_dir: Path) -> list[tuple[str, EditVerdict]]:
    """Start the diffusion and prefill services on `model_dir` (the prefill with the task's input
    resize), send every eval edit through the client, and check each image."""
    with ServiceProcess("diffusion_service", ["--model", str(model_dir)]) as diffusion:
        diffusion.wait_serving()
        args = ["--model", str(model_dir), "--diffusion", diffusion.address, *PREFILL_EDIT_FLAGS]
        with ServiceProcess("prefill_service", args) as prefill:
            prefill.wait_serving()
            results = []
            with BagelClient(prefill.address, timeout=120) as client:
                for prompt in EDIT_EVAL_PROMPTS:
                    result = client.edit(
                        prompt.source_image(),
                        prompt.text,
                        num_timesteps=TIMESTEPS,
                        seed=prompt.seed,
                    )
                    assert result.image.size == (128, 128)  # the input's size, by default
                    results.append(
                        (prompt.text, check_edit(result.image, prompt.text, prompt.source))
                    )
    return results


@pytest.mark.slow
def test_trained_checkpoint_makes_at_least_11_of_12_edits_through_both_services():
    results = edit_verdicts_through_services(TRAINED)
    failed = [(text, verdict) for text, verdict in results if not verdict.passed]
    assert len(results) - len(failed) >= REQUIRED, failed


@pytest.mark.slow
def test_random_tiny_checkpoint_fails_the_same_edits_through_both_services(tiny_model_dir):
    results = edit_verdicts_through_services(tiny_model_dir)
    passed = sum(verdict.passed for _, verdict in results)
    assert passed < REQUIRED, results
