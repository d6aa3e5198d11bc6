"""Shared pieces of the reliability suite: the tally every test reports into (printed as one
summary line per category at the end of the run), the in-process reference pipeline, and the
service pairs (a 2-rank diffusion service with the real prefill service in front of it)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from bagel.network.kv import Branch, ContextKV
from bagel.pipeline import Pipeline
from serving.params import GenerationParams
from tests.helpers.processes import ServiceProcess, pids_with_arg
from tests.helpers.ranks import free_port
from tests.helpers.tally import TALLY, Tally

PROMPT = "a yellow submarine"
NEGATIVE = "grey"
SMALL = GenerationParams(height=32, width=32, num_timesteps=4, negative_prompt=NEGATIVE)


@pytest.fixture(scope="session")
def tally(request: pytest.FixtureRequest) -> Tally:
    return request.config.stash[TALLY]


@pytest.fixture(scope="session")
def pipeline(tiny_model_dir: Path) -> Pipeline:
    return Pipeline(tiny_model_dir, "cpu")


@pytest.fixture(scope="session")
def contexts(pipeline: Pipeline) -> dict[Branch, ContextKV]:
    return pipeline.prefill(PROMPT, negative_prompt=NEGATIVE)


def kv_bytes(contexts: dict[Branch, ContextKV]) -> int:
    return sum(t.numel() * t.element_size() for c in contexts.values() for t in c.keys + c.values)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=int)


@dataclass
class ServicePair:
    """A diffusion service (2 ranks, Ulysses 2) and the real prefill service in front of it. The
    diffusion service keeps its port when a test restarts it."""

    model_dir: Path
    diffusion_args: list[str]
    prefill_args: list[str] = field(default_factory=list)
    diffusion_port: int = field(default_factory=free_port)
    diffusion: ServiceProcess | None = None
    prefill: ServiceProcess | None = None

    def start(self) -> ServicePair:
        self.start_diffusion()
        args = ["--model", str(self.model_dir), "--diffusion", self.diffusion_address]
        self.prefill = ServiceProcess("prefill_service", [*args, *self.prefill_args])
        return self

    def start_diffusion(self) -> ServiceProcess:
        args = ["--model", str(self.model_dir), "--ulysses", "2", *self.diffusion_args]
        self.diffusion = ServiceProcess("diffusion_service", args, port=self.diffusion_port)
        return self.diffusion

    def wait_serving(self, timeout: float = 120.0) -> ServicePair:
        self.diffusion.wait_serving(timeout)
        self.prefill.wait_serving(timeout)
        return self

    @property
    def diffusion_address(self) -> str:
        return f"127.0.0.1:{self.diffusion_port}"

    def close(self) -> None:
        for service in (self.prefill, self.diffusion):
            if service is not None:
                service.__exit__()
        assert pids_with_arg(f"--listen {self.diffusion_address}") == []


def wait_for(condition, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True
