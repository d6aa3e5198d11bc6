"""The diffusion service as one torchrun group over two "nodes": two torchrun agents on
127.0.0.1 (static rendezvous: `--nnodes 2 --node-rank 0|1 --master-addr`), one process each, a
`--ulysses 2` group over gloo; global rank 0 (on node 0) serves gRPC. Its output equals the
single-process reference; a killed rank takes the whole group down, and torchrun
(`--max-restarts 1`) starts it again with the same output."""

from __future__ import annotations

import io
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bagel.pipeline import Pipeline
from serving.params import GenerationParams
from tests.diffusion_service.kv_stream import generate, kv_frames, latents_of
from tests.helpers.processes import ServiceProcess, health_status, pids_with_arg
from tests.helpers.ranks import free_port

PARAMS = GenerationParams(height=48, width=80, num_timesteps=8, seed=11)
START_TIMEOUT_S = 90.0


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir: Path) -> Pipeline:
    return Pipeline(tiny_model_dir, "cpu")


@pytest.fixture(scope="module")
def contexts(pipeline: Pipeline):
    return pipeline.prefill("a yellow submarine", negative_prompt="grey")


@pytest.fixture(scope="module")
def reference(pipeline: Pipeline, contexts) -> torch.Tensor:
    return pipeline.denoise(contexts, PARAMS)


@pytest.fixture(scope="module")
def two_nodes(tiny_model_dir: Path):
    """Node 0 and node 1: one torchrun agent each, both listing the same `--listen` (only global
    rank 0 binds it). Not waited for here: the reference is computed while they start."""
    master_port, listen_port = free_port(), free_port()
    nodes = [
        ServiceProcess(
            "torch.distributed.run",
            [
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--node-rank",
                str(node),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(master_port),
                "--max-restarts",
                "1",
                "-m",
                "diffusion_service",
                "--model",
                str(tiny_model_dir),
                "--ulysses",
                "2",
            ],
            port=listen_port,
        )  # fmt: skip
        for node in (0, 1)
    ]
    try:
        yield nodes
    finally:
        for node in nodes:
            node.__exit__()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def rank_pid(address: str, rank: int) -> int:
    """The worker process (not the torchrun agent) that torchrun started as global `rank`."""
    for pid in pids_with_arg(f"--listen {address}"):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    raise LookupError(f"no process of rank {rank}")


@pytest.mark.slow  # two torchrun agents and their workers: ~15 s of start-up
def test_two_torchrun_nodes_serve_one_group_equal_to_the_single_process_reference(
    two_nodes, pipeline, contexts, reference
):
    node0, node1 = two_nodes
    node0.wait_serving(START_TIMEOUT_S)
    fp = pipeline.config.fingerprint()
    got = latents_of(generate(node0.address, kv_frames(contexts, fp, PARAMS, latents_only=True)))
    assert rel_err(got, reference) < 1e-5
    png = generate(node0.address, kv_frames(contexts, fp, PARAMS))[-1].image.png
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=int)
    expected = np.asarray(pipeline.decode(reference, PARAMS.height, PARAMS.width), dtype=int)
    assert np.abs(image - expected).max() <= 1
    # Two nodes of one world, and the gRPC server on node 0's rank 0.
    assert "torchrun: rank 0 of 2 (node 0 of 2, local rank 0 of 1" in node0.log()
    assert "torchrun: rank 1 of 2 (node 1 of 2, local rank 0 of 1" in node1.log()
    assert f"serving on {node0.address}" in node0.log()


@pytest.mark.slow  # a whole torchrun restart: ~15 s
def test_a_killed_rank_takes_the_group_down_and_torchrun_restarts_all_of_it(
    two_nodes, pipeline, contexts, reference
):
    node0, node1 = two_nodes
    node0.wait_serving(START_TIMEOUT_S)
    os.kill(rank_pid(node0.address, 1), signal.SIGKILL)
    statuses = []
    deadline = time.monotonic() + 10.0  # rank 0's heartbeat (2 s) notices, then it exits
    while time.monotonic() < deadline and (not statuses or statuses[-1] == "SERVING"):
        statuses.append(health_status(node0.address, timeout=0.5))
        time.sleep(0.1)
    assert statuses[-1] != "SERVING", statuses  # NOT_SERVING, then no server at all
    node0.wait_serving(START_TIMEOUT_S)
    fp = pipeline.config.fingerprint()
    got = latents_of(generate(node0.address, kv_frames(contexts, fp, PARAMS, latents_only=True)))
    assert rel_err(got, reference) < 1e-5
    log0, log1 = node0.log(), node1.log()
    assert "exiting with status 1 so that torchrun restarts the whole group" in log0
    assert "torchrun: rank 0 of 2 (node 0 of 2, local rank 0 of 1, restart 1 of at most 1)" in log0
    assert "torchrun: rank 1 of 2 (node 1 of 2, local rank 0 of 1, restart 1 of at most 1)" in log1
    for node in (node0, node1):  # node 0 first: rank 0 drains, then tells the others to stop
        node.stop()
    assert node0.leftover_pids() == []
