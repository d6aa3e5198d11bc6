"""Step caching through both real services (client -> prefill -> diffusion ranks), on every
topology: threshold 0 is byte-identical to no cache, and a positive threshold reuses the same
steps and draws the same image whatever the topology (within one 8-bit level, the tolerance of
the uncached topology tests: fp32 sums in another order can round a pixel the other way)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client import BagelClient
from tests.helpers.processes import ServiceProcess

TOPOLOGIES = {  # the 1-rank service also shows --default-cache: requests that set none get it
    "1 rank": ["--default-cache", "dbcache:fn=1,warmup=2,threshold=0.3"],
    "ulysses 2": ["--ulysses", "2"],
    "ring 2": ["--ring", "2"],
    "cfg 2": ["--cfg-parallel", "2"],
    "cfg 2 x ulysses 2": ["--cfg-parallel", "2", "--ulysses", "2"],
    "kv gather 2": ["--kv-gather", "2"],
}
REQUEST = {"height": 48, "width": 80, "num_timesteps": 13, "seed": 7, "cfg_interval": (0.0, 1.0)}
ZERO = {
    "teacache": "teacache:threshold=0",
    "dbcache": "dbcache:fn=1,warmup=0,threshold=0",
}
POSITIVE = {
    "teacache": "teacache:threshold=0.3",
    "dbcache": "dbcache:fn=1,warmup=2,threshold=0.3",
    "dbcache+taylorseer": "dbcache:fn=1,bn=1,warmup=2,threshold=0.3+taylorseer:order=2",
}


def _generate(client: BagelClient, cache: str | None):
    result = client.generate("A cute cat on a mat", cache=cache, **REQUEST)
    return result.png, result.cached_steps


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path) -> dict[str, dict[str, tuple[bytes, list[int]]]]:
    """Every topology's PNG and cached steps, per cache spec ("unset": the service default)."""
    out: dict[str, dict[str, tuple[bytes, list[int]]]] = {}
    model = ["--model", str(tiny_model_dir)]
    for name, topology in TOPOLOGIES.items():
        with ServiceProcess("diffusion_service", model + topology) as diffusion:
            diffusion.wait_serving()
            prefill_args = model + ["--diffusion", diffusion.address]
            with ServiceProcess("prefill_service", prefill_args) as prefill:
                prefill.wait_serving()
                with BagelClient(prefill.address, timeout=120) as client:
                    specs = ["none", *ZERO.values(), *POSITIVE.values()]
                    out[name] = {spec: _generate(client, spec) for spec in specs}
                    out[name]["unset"] = _generate(client, None)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("topology", sorted(TOPOLOGIES))
@pytest.mark.parametrize("policy", sorted(ZERO))
def test_threshold_zero_png_is_byte_identical_to_no_cache(runs, topology, policy):
    png, cached = runs[topology][ZERO[policy]]
    assert cached == []
    assert png == runs[topology]["none"][0]


@pytest.mark.slow
@pytest.mark.parametrize("policy", sorted(POSITIVE))
def test_a_positive_threshold_caches_the_same_steps_and_png_on_every_topology(runs, policy):
    spec = POSITIVE[policy]
    png, cached = runs["1 rank"][spec]
    assert cached, "no step was served from the cache"
    assert png != runs["1 rank"]["none"][0]
    for topology in TOPOLOGIES:
        assert runs[topology][spec][1] == cached, topology
        assert np.abs(pixels(runs[topology][spec][0]) - pixels(png)).max() <= 1, topology


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=int)


@pytest.mark.slow
def test_a_request_without_a_policy_gets_the_default_cache_of_the_service(runs):
    assert runs["1 rank"]["unset"] == runs["1 rank"][POSITIVE["dbcache"]]
    assert runs["ulysses 2"]["unset"][1] == []  # that service's default is none
    assert runs["kv gather 2"]["unset"][0] == runs["kv gather 2"]["none"][0]
