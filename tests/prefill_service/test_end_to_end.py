"""Client -> prefill service -> diffusion service, all real processes on 127.0.0.1, against the
in-process reference pipeline (fp32 CPU, tiny checkpoint)."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from bagel.pipeline import Pipeline
from client import BagelClient, build_request
from prefill_service.mock import synthetic_contexts
from protos import OutputFormat, PrefillStub
from serving.params import GenerationParams
from tests.helpers.processes import ServiceProcess

SMALL = {"height": 48, "width": 80, "num_timesteps": 8}


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir: Path) -> Pipeline:
    return Pipeline(tiny_model_dir, "cpu")


@pytest.fixture(scope="module")
def diffusion(tiny_model_dir: Path):
    with ServiceProcess("diffusion_service", ["--model", str(tiny_model_dir)]) as service:
        yield service.wait_serving()


@pytest.fixture(scope="module")
def prefill(tiny_model_dir: Path, diffusion: ServiceProcess):
    args = ["--model", str(tiny_model_dir), "--diffusion", diffusion.address]
    with ServiceProcess("prefill_service", args) as service:
        yield service.wait_serving()


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=int)


def reference_image(pipeline: Pipeline, prompt: str, seed: int, negative: str = "") -> np.ndarray:
    params = GenerationParams(seed=seed, negative_prompt=negative, **SMALL)
    return pixels(pipeline.generate(prompt, params).image)


def test_png_through_both_services_equals_the_in_process_reference(prefill, pipeline):
    with BagelClient(prefill.address, timeout=60) as client:
        result = client.generate("A cute cat", seed=11, negative_prompt="grey", **SMALL)
    assert (result.width, result.height, result.seed) == (80, 48, 11)
    assert (
        np.abs(pixels(result.image) - reference_image(pipeline, "A cute cat", 11, "grey")).max()
        <= 1
    )
    for phase in ("prefill_ms", "kv_send_ms", "receive_ms", "denoise_ms", "decode_ms"):
        assert result.timings[phase] > 0, phase


def test_latents_through_both_services_equal_the_reference_within_1e_5(prefill, pipeline):
    request = build_request("A red apple on a table", seed=5, **SMALL)
    request.params.output_format = OutputFormat.OUTPUT_FORMAT_LATENTS
    with grpc.insecure_channel(prefill.address) as channel:  # the client has no latents option
        events = list(PrefillStub(channel).Generate(request, timeout=60))
    [latents] = [e.latents for e in events if e.WhichOneof("event") == "latents"]
    array = np.frombuffer(latents.data, dtype="<f4").reshape(tuple(latents.shape))
    got = torch.from_numpy(array.copy())
    params = GenerationParams(seed=5, **SMALL)
    want = pipeline.denoise(pipeline.prefill("A red apple on a table"), params)
    assert got.shape == want.shape
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


def test_four_concurrent_clients_two_requests_each_get_their_own_image(prefill, pipeline):
    jobs = {(i, j): (f"A small house number {i}", 100 * i + j) for i in range(4) for j in range(2)}
    images: dict[tuple[int, int], np.ndarray] = {}
    errors: list[BaseException] = []

    def client_thread(i: int) -> None:
        try:
            with BagelClient(prefill.address, timeout=120) as client:
                for j in range(2):
                    prompt, seed = jobs[i, j]
                    images[i, j] = pixels(client.generate(prompt, seed=seed, **SMALL).image)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert errors == [] and len(images) == 8
    for key, (prompt, seed) in jobs.items():
        assert np.abs(images[key] - reference_image(pipeline, prompt, seed)).max() <= 1, key


def test_mock_prefill_through_real_diffusion_matches_the_pipeline_fed_the_same_kv(
    tiny_model_dir, diffusion, pipeline
):
    prompt, kwargs = "A cute cat", {"seed": 52, "negative_prompt": "blurry", **SMALL}
    args = ["--model", str(tiny_model_dir), "--diffusion", diffusion.address]
    with ServiceProcess("prefill_service.mock", args) as mock:
        mock.wait_serving()
        with BagelClient(mock.address, timeout=60) as client:
            result = client.generate(prompt, **kwargs)
    params = GenerationParams.from_proto(build_request(prompt, **kwargs).params)
    contexts = synthetic_contexts(pipeline.config, prompt, params)
    latents = pipeline.denoise(contexts, params)
    reference = pixels(pipeline.decode(latents, params.height, params.width))
    assert np.abs(pixels(result.image) - reference).max() <= 1
