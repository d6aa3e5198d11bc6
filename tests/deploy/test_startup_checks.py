"""A misconfigured service refuses to start with one line naming the fault and exit status 2
(no traceback, no "serving" line), and the prefill service says "serving" only while it serves.
Real processes, as an operator starts them."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from safetensors.torch import load_file, save_file

from protos import DIFFUSION_SERVICE
from tests.helpers.processes import ROOT, ServiceProcess, health_status
from tests.helpers.ranks import free_port

# The mock prefill service starts through the same checks as the real one: `slow` (CI runs it).
SERVICES = [
    "diffusion_service",
    "prefill_service",
    pytest.param("prefill_service.mock", marks=pytest.mark.slow),
]
GEN_KEY = "language_model.model.layers.1.mlp_moe_gen.up_proj.weight"


def start(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def refused_with(done: subprocess.CompletedProcess) -> str:
    """The one line a refused start printed (and nothing else)."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "serving" not in done.stderr.lower()
    [line] = done.stderr.splitlines()
    return line


@pytest.mark.parametrize("module", SERVICES)
def test_listen_without_a_port_is_refused(module, tiny_model_dir):
    done = start(module, "--model", str(tiny_model_dir), "--listen", "localhost")
    assert refused_with(done) == "error: --listen 'localhost' is not HOST:PORT (a port 0-65535)"


@pytest.mark.parametrize("module", SERVICES)
def test_a_port_in_use_is_refused(module, tiny_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = start(module, "--model", str(tiny_model_dir), "--listen", f"127.0.0.1:{port}")
    assert refused_with(done) == (
        f"error: --listen 127.0.0.1:{port}: port {port} is already in use (is another server "
        "running there?)"
    )


@pytest.mark.parametrize("module", SERVICES)
def test_an_address_not_on_this_host_is_refused(module, tiny_model_dir):
    listen = f"192.0.2.1:{free_port()}"  # TEST-NET-1: never a local address
    done = start(module, "--model", str(tiny_model_dir), "--listen", listen)
    assert refused_with(done) == (
        f"error: --listen {listen}: cannot bind: Cannot assign requested address (not an address "
        "of this host?)"
    )


@pytest.mark.parametrize("module", SERVICES)
def test_a_missing_model_directory_is_refused(module, tmp_path):
    missing = tmp_path / "out" / "tiny-bagel"
    done = start(module, "--model", str(missing), "--listen", f"127.0.0.1:{free_port()}")
    line = refused_with(done)
    assert line.startswith(f"error: --model {missing}: ")


@pytest.mark.parametrize("module", ["diffusion_service", "prefill_service"])
def test_a_partial_checkpoint_is_refused_naming_the_key(module, tiny_model_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(tiny_model_dir, partial)
    tensors = load_file(partial / "ema.safetensors")
    del tensors[GEN_KEY]
    save_file(tensors, partial / "ema.safetensors")
    done = start(module, "--model", str(partial), "--listen", f"127.0.0.1:{free_port()}")
    assert refused_with(done) == (
        f"error: --model {partial}: ema.safetensors: missing key {GEN_KEY}; list them all with "
        f"`python -m bagel.checkpoints.check_checkpoint {partial}`"
    )


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch has CUDA: nothing to refuse")
@pytest.mark.parametrize("module", ["diffusion_service", "prefill_service"])
def test_cuda_on_a_cpu_only_torch_is_refused(module, tiny_model_dir):
    args = ["--model", str(tiny_model_dir), "--listen", f"127.0.0.1:{free_port()}"]
    done = start(module, *args, "--device", "cuda")
    assert refused_with(done) == (
        f"error: --device cuda: this torch ({torch.__version__}) is a CPU-only build; install a "
        "CUDA build (README, 'Set-up') or use --device cpu"
    )


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_a_prefill_service_says_serving_only_while_its_diffusion_service_serves(tiny_model_dir):
    diffusion_port = free_port()
    args = ["--model", str(tiny_model_dir), "--diffusion", f"127.0.0.1:{diffusion_port}"]
    with ServiceProcess("prefill_service.mock", args) as prefill:
        wait_for(lambda: "loaded" in prefill.log())
        wait_for(lambda: "not serving: no diffusion service is serving" in prefill.log())
        assert health_status(prefill.address) == "NOT_SERVING"
        assert "serving on" not in prefill.log()

        # A stand-in diffusion service: only its health, which is all the prefill service asks.
        stand_in = grpc.server(ThreadPoolExecutor(max_workers=2))
        status = health.HealthServicer()
        status.set(DIFFUSION_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(status, stand_in)
        stand_in.add_insecure_port(f"127.0.0.1:{diffusion_port}")
        stand_in.start()
        try:
            wait_for(lambda: health_status(prefill.address) == "SERVING")
            wait_for(lambda: f"serving on {prefill.address}" in prefill.log())
        finally:
            stand_in.stop(None)
        wait_for(lambda: health_status(prefill.address) == "NOT_SERVING")
        assert prefill.log().count("not serving: no diffusion service is serving") == 2
