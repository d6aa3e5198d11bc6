"""The gateway's test stack, all real processes on 127.0.0.1: the diffusion service and the
prefill service on the trained tiny checkpoint, and gateways in front of them, driven by the
official `openai` SDK. Each module starts its services once."""

from __future__ import annotations

import base64
import io
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import numpy as np
import openai
import pytest
from PIL import Image

from tests.helpers.processes import ROOT, ServiceProcess

MODEL = ROOT / "examples" / "tiny_shapes" / "checkpoint"
PROMPT = "a red circle on a white background"
SIZE = "128x128"  # the checkpoint's native size
STEPS = 6
MAX_QUEUE = 2  # the test diffusion service's: room for n=2 behind a request still finishing


class GatewayProcess(ServiceProcess):
    """`python -m gateway ... --listen 127.0.0.1:PORT`, ready once /health answers."""

    def __init__(self, prefill: str, *args: str, ca: str | None = None) -> None:
        """`ca`: the gateway serves HTTPS, with a certificate this CA signed."""
        super().__init__("gateway", ["--prefill", prefill, *args])
        self.ca = ca
        self.url = f"{'https' if ca else 'http'}://{self.address}"

    def wait_serving(self, timeout: float = 60.0) -> GatewayProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
            if http_status(f"{self.url}/health", ca=self.ca) == 200:
                return self
            time.sleep(0.1)
        raise TimeoutError(f"gateway not serving after {timeout} s:\n{self.log()}")

    def sdk(self, api_key: str = "unused", **kwargs) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120, **kwargs
        )


def http_status(url: str, timeout: float = 2.0, ca: str | None = None) -> int:
    context = ssl.create_default_context(cafile=ca) if ca else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as reply:
            return reply.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def decoded(b64_json: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64_json)))
    image.load()
    return image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=int)


def wait_for(condition, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


# The services behind the gateways: one pair per test worker, shared by the test files (each
# file starts the gateway it tests); a test leaves them serving as it found them.
@pytest.fixture(scope="session")
def diffusion() -> Iterator[ServiceProcess]:
    # A short queue behind the running job, so that a full queue is easy to provoke.
    args = ["--model", str(MODEL), "--max-queue", str(MAX_QUEUE)]
    with ServiceProcess("diffusion_service", args) as service:
        yield service.wait_serving()


@pytest.fixture(scope="session")
def prefill(diffusion: ServiceProcess) -> Iterator[ServiceProcess]:
    args = ["--model", str(MODEL), "--diffusion", diffusion.address]
    with ServiceProcess("prefill_service", args) as service:
        yield service.wait_serving()


@pytest.fixture(scope="module")
def gateway(prefill: ServiceProcess) -> Iterator[GatewayProcess]:
    with GatewayProcess(prefill.address) as service:
        yield service.wait_serving()


@pytest.fixture(scope="module")
def sdk(gateway: GatewayProcess) -> openai.OpenAI:
    return gateway.sdk()
