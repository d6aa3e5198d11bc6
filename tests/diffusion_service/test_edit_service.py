"""Image editing through both real services (client -> prefill -> diffusion ranks), fp32 on CPU:
the latents equal the in-process `Pipeline.edit` within 1e-5 of their scale on 1 rank, Ulysses 2,
Ring 2, CFG 3 (each branch on its own rank) and CFG 2 x Ulysses 2; and each of the three contexts
reaches the ranks: change one, and the output changes as the in-process denoise says."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bagel.network.kv import Branch, ContextKV
from bagel.pipeline import Pipeline
from bagel.prompting.contexts import EditResize
from bagel.prompting.image_transforms import ResizeRule
from client import BagelClient
from serving.imaging.input_images import EDIT_DEFAULTS
from serving.params import GenerationParams
from tests.diffusion_service.kv_stream import generate, kv_frames, latents_of
from tests.helpers.processes import ServiceProcess

RULES = EditResize(ResizeRule(128, 64, 16), ResizeRule(112, 56, 14))
RULE_FLAGS = ["--edit-vae-resize", "128,64", "--edit-vit-resize", "112,56"]
PROMPT = "make the circle blue"
TOPOLOGIES = {
    "1 rank": [],
    "ulysses 2": ["--ulysses", "2"],
    "ring 2": ["--ring", "2"],
    "cfg 3": ["--cfg-parallel", "3"],
    "cfg 2 x ulysses 2": ["--cfg-parallel", "2", "--ulysses", "2"],
}
# No negative prompt: uncond_text is the start of cond and travels as a reference to it.
REQUEST = {"num_timesteps": 6, "seed": 5}


def input_png() -> bytes:
    rng = np.random.default_rng(7)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir: Path) -> Pipeline:
    return Pipeline(tiny_model_dir, "cpu")


@pytest.fixture(scope="module")
def expected(pipeline) -> tuple[torch.Tensor, GenerationParams]:
    """The in-process edit: the input's resized size (90x60 -> 96x64) and the editing CFG."""
    image = Image.open(io.BytesIO(input_png()))
    size = pipeline.edit_image(image, RULES)
    params = GenerationParams(**{**EDIT_DEFAULTS, **REQUEST}, width=size.width, height=size.height)
    return pipeline.edit(image, PROMPT, params, RULES).latents, params


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    model = ["--model", str(tiny_model_dir)]
    for name, topology in TOPOLOGIES.items():
        with ServiceProcess("diffusion_service", model + topology) as diffusion:
            diffusion.wait_serving()
            prefill_args = model + RULE_FLAGS + ["--diffusion", diffusion.address]
            with ServiceProcess("prefill_service", prefill_args) as prefill:
                prefill.wait_serving()
                with BagelClient(prefill.address, timeout=120) as client:
                    result = client.edit(input_png(), PROMPT, output_format="latents", **REQUEST)
        out[name] = torch.from_numpy(result.latents)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("topology", list(TOPOLOGIES))
def test_an_edit_through_both_services_equals_the_in_process_edit(served, expected, topology):
    latents, params = expected
    assert latents.shape == (params.height // 16 * params.width // 16, 64)
    assert rel_err(served[topology], latents) < 1e-5


@pytest.fixture(scope="module")
def cfg3(tiny_model_dir: Path):
    with ServiceProcess(
        "diffusion_service", ["--model", str(tiny_model_dir), "--cfg-parallel", "3"]
    ) as svc:
        svc.wait_serving()
        yield svc


def scaled(context: ContextKV, factor: float) -> ContextKV:
    return dataclasses.replace(context, values=[v * factor for v in context.values])


@pytest.mark.slow
@pytest.mark.parametrize("branch", list(Branch), ids=str)
def test_each_of_the_three_contexts_reaches_its_rank_and_moves_the_output(
    pipeline, expected, cfg3, branch
):
    _, params = expected
    image = pipeline.edit_image(Image.open(io.BytesIO(input_png())), RULES)
    contexts = pipeline.edit_contexts(image, PROMPT)
    assert len({c.num_tokens for c in contexts.values()}) == 3  # three distinct contexts
    fingerprint = pipeline.config.fingerprint()
    baseline = latents_of(
        generate(cfg3.address, kv_frames(contexts, fingerprint, params, latents_only=True))
    )
    changed = {**contexts, branch: scaled(contexts[branch], 1.5)}
    got = latents_of(
        generate(cfg3.address, kv_frames(changed, fingerprint, params, latents_only=True))
    )
    assert rel_err(got, baseline) > 1e-3  # the change reached the output
    assert rel_err(got, pipeline.denoise(changed, params)) < 1e-5
