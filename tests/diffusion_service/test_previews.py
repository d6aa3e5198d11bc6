"""Partial images: the diffusion service sends the number of previews a request asks for, at the
sampler's preview steps, each equal to the in-process reference's clean-image estimate through the
same latent -> RGB map, on every layout; the final image is unchanged byte for byte."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bagel.diffusion.sampler import preview_steps
from bagel.pipeline import Pipeline
from serving.params import GenerationParams
from tests.diffusion_service.kv_stream import generate, kv_frames
from tests.helpers.processes import ServiceProcess

PARAMS = GenerationParams(height=48, width=80, num_timesteps=8, seed=5, partial_images=3)
TOTAL_STEPS = PARAMS.num_timesteps - 1


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir: Path) -> Pipeline:
    return Pipeline(tiny_model_dir, "cpu")


@pytest.fixture(scope="module")
def contexts(pipeline):
    return pipeline.prefill("a green triangle", negative_prompt="blurry")


@pytest.fixture(scope="module")
def reference_previews(pipeline, contexts) -> list[np.ndarray]:
    steps = preview_steps(TOTAL_STEPS, PARAMS.partial_images)
    estimates = {}
    pipeline.denoise(
        contexts,
        PARAMS,
        on_estimate=lambda step, x0: estimates.setdefault(step, x0.clone()),
        estimate_steps=frozenset(steps),
    )
    return [pipeline.preview(estimates[s], PARAMS.height, PARAMS.width) for s in steps]


# Each topology starts a service of its own; `make test` keeps CFG parallelism, Ulysses is `slow`.
@pytest.fixture(
    scope="module",
    params=[
        pytest.param(["--ulysses", "2"], id="['--ulysses', '2']", marks=pytest.mark.slow),
        pytest.param(["--cfg-parallel", "2"], id="['--cfg-parallel', '2']"),
    ],
)
def diffusion(request, tiny_model_dir):
    args = ["--model", str(tiny_model_dir), *request.param]
    with ServiceProcess("diffusion_service", args) as svc:
        yield svc.wait_serving()


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=int)


def test_previews_arrive_in_step_order_and_equal_the_reference_estimate(
    diffusion, pipeline, contexts, reference_previews
):
    events = generate(diffusion.address, kv_frames(contexts, pipeline.config.fingerprint(), PARAMS))
    expected_steps = preview_steps(TOTAL_STEPS, PARAMS.partial_images)
    previews = [e.partial_image for e in events if e.WhichOneof("event") == "partial_image"]
    assert [(p.index, p.step) for p in previews] == list(enumerate(expected_steps))
    # Each preview comes after the progress of the step before it and before its own step's.
    order = [
        ("preview", e.partial_image.step)
        if kind == "partial_image"
        else ("progress", e.progress.step)
        for e in events
        if (kind := e.WhichOneof("event")) in ("partial_image", "progress")
    ]
    for step in expected_steps:
        at = order.index(("preview", step))
        assert order[at - 1] == ("progress", step - 1) if step > 1 else at == 0
        assert order[at + 1] == ("progress", step)
    rows, cols = pipeline.config.latent_grid(PARAMS.height, PARAMS.width)
    side = pipeline.config.latent_patch_size
    for preview, reference in zip(previews, reference_previews, strict=True):
        assert (preview.height, preview.width) == (rows * side, cols * side)
        got = pixels(preview.png)
        assert got.shape == reference.shape
        assert np.abs(got - reference.astype(int)).max() <= 1


def test_asking_for_previews_leaves_the_image_unchanged_byte_for_byte(
    diffusion, pipeline, contexts
):
    fingerprint = pipeline.config.fingerprint()
    with_previews = generate(diffusion.address, kv_frames(contexts, fingerprint, PARAMS))
    without = generate(
        diffusion.address,
        kv_frames(contexts, fingerprint, dataclasses.replace(PARAMS, partial_images=0)),
    )
    assert not [e for e in without if e.WhichOneof("event") == "partial_image"]
    assert with_previews[-1].image.png == without[-1].image.png
