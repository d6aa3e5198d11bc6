"""GetModelInfo on both services (real processes, the trained tiny checkpoint): the checkpoint's
name and native size, the model's limits, the schema's defaults, precision and layout; a client
that sets no size gets the native size, and the image equals the in-process reference's."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest

from bagel.pipeline import Pipeline
from client import BagelClient
from protos import DiffusionStub, ModelInfoRequest, PrefillStub
from serving.params import GenerationParams
from tests.helpers.processes import ROOT, ServiceProcess

TRAINED = ROOT / "examples" / "tiny_shapes" / "checkpoint"
PROMPT = "a red circle on a white background"


@pytest.fixture(scope="module")
def diffusion():
    args = ["--model", str(TRAINED), "--ulysses", "2"]
    with ServiceProcess("diffusion_service", args) as service:
        yield service.wait_serving()


@pytest.fixture(scope="module")
def prefill(diffusion: ServiceProcess):
    args = ["--model", str(TRAINED), "--diffusion", diffusion.address]
    with ServiceProcess("prefill_service", args) as service:
        yield service.wait_serving()


def ask(stub_class, address: str):
    with grpc.insecure_channel(address) as channel:
        return stub_class(channel).GetModelInfo(ModelInfoRequest(), timeout=10)


def test_the_diffusion_service_describes_its_model_and_layout(diffusion):
    info = ask(DiffusionStub, diffusion.address)
    defaults = GenerationParams()
    assert (info.model_name, info.native_size, info.max_size, info.size_step) == (
        "tiny-shapes",
        128,
        1024,
        16,
    )
    assert info.default_num_timesteps == defaults.num_timesteps == 50
    assert (info.default_cfg_text_scale, info.default_cfg_img_scale) == (4.0, 1.5)
    assert info.can_edit and not info.can_understand
    assert info.precision == "fp32"
    assert info.layout == "2 rank(s): ulysses 2, ring 1, cfg 1, sp attention ulysses"
    assert len(info.model_fingerprint) == 32


def test_the_prefill_service_gives_the_same_model_with_the_diffusion_layout(prefill, diffusion):
    mine, theirs = ask(PrefillStub, prefill.address), ask(DiffusionStub, diffusion.address)
    assert mine.can_understand and not theirs.can_understand  # text comes from the prefill side
    mine.can_understand = False
    assert mine == theirs


def test_a_client_without_a_size_gets_the_native_size_and_the_reference_image(prefill):
    with BagelClient(prefill.address, timeout=120) as client:
        result = client.generate(PROMPT, seed=3, steps=6)
    assert (result.width, result.height) == (128, 128)
    params = GenerationParams(height=128, width=128, num_timesteps=6, seed=3)
    want = Pipeline(TRAINED, "cpu").generate(PROMPT, params).image
    got = np.asarray(result.image.convert("RGB"), dtype=int)
    assert np.abs(got - np.asarray(want.convert("RGB"), dtype=int)).max() <= 1


@pytest.mark.slow  # a copied checkpoint and a service of its own: ~15 s
def test_a_checkpoint_without_model_info_is_named_by_its_folder_at_its_largest_size(
    tiny_model_dir: Path, tmp_path: Path
):
    bare = tmp_path / "BAGEL-7B-MoT"
    shutil.copytree(tiny_model_dir, bare)
    (bare / "model_info.json").unlink()
    with ServiceProcess("diffusion_service", ["--model", str(bare)]) as service:
        info = ask(DiffusionStub, service.wait_serving().address)
    assert (info.model_name, info.native_size, info.max_size) == ("BAGEL-7B-MoT", 1024, 1024)
