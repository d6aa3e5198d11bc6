"""`--cuda-allocator` reaches every rank before CUDA starts in it: `python -m diffusion_service`'s
`main` writes it to its environment before rank 0 forks the launcher of our own ranks, and each
process torchrun starts writes it itself; the operator's PYTORCH_CUDA_ALLOC_CONF wins."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

import diffusion_service.__main__ as service_main
from diffusion_service import launch

CONF = "PYTORCH_CUDA_ALLOC_CONF"
TORCHRUN = ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_RANK")
CASES = [  # (the operator's PYTORCH_CUDA_ALLOC_CONF, flags, what a rank's environment holds)
    (None, [], "expandable_segments:True"),
    (None, ["--cuda-allocator", "default"], None),
    ("max_split_size_mb:64", [], "max_split_size_mb:64"),
]


@pytest.fixture
def environment(monkeypatch):
    """No allocator configuration and no torchrun; whatever `main` writes is undone after."""
    for name in (CONF, "PYTORCH_ALLOC_CONF", *TORCHRUN):
        monkeypatch.setenv(name, "")  # so that undoing the delenv below removes it again
        monkeypatch.delenv(name)
    monkeypatch.setattr(service_main, "check_startup", lambda settings, serves_grpc: None)
    return monkeypatch


def what_this_process_sees() -> dict:
    return {"conf": os.environ.get(CONF), "cuda_initialized": torch.cuda.is_initialized()}


def run_main(monkeypatch, tmp_path: Path, *argv: str) -> None:
    monkeypatch.setattr(
        sys, "argv", ["diffusion_service", "--model", str(tmp_path), "--device", "cuda", *argv]
    )
    service_main.main()


def run_own_ranks(monkeypatch, tmp_path: Path, *argv: str) -> dict[int, dict]:
    """What rank 0 and each forked rank see when `main` starts a group of three."""
    seen: dict[int, dict] = {}

    def worker(settings, rank, world, port):  # stands in for a forked rank: reports, then waits
        (tmp_path / f"rank{rank}.json").write_text(json.dumps(what_this_process_sees()))
        time.sleep(60)

    def run(settings):  # rank 0: forks the launcher and starts the workers, as `run` does
        seen[0] = what_this_process_sees()
        group = launch.rank_group(settings)
        try:
            group._start_others()
            files = [tmp_path / f"rank{rank}.json" for rank in (1, 2)]
            deadline = time.monotonic() + 30
            while not all(f.exists() and f.read_text() for f in files):
                assert time.monotonic() < deadline, "the workers did not start"
                time.sleep(0.05)
            seen.update({rank: json.loads(f.read_text()) for rank, f in enumerate(files, 1)})
        finally:
            group.close()
        return 0

    monkeypatch.setattr(launch, "worker_main", worker)
    monkeypatch.setattr(service_main, "run", run)
    run_main(monkeypatch, tmp_path, "--ring", "3", *argv)
    return seen


@pytest.mark.parametrize(("operator", "argv", "want"), CASES)
def test_our_own_ranks_start_with_the_allocator_configured_before_cuda(
    environment, tmp_path, operator, argv, want
):
    if operator is not None:
        environment.setenv(CONF, operator)
    seen = run_own_ranks(environment, tmp_path, *argv)
    assert seen == dict.fromkeys((0, 1, 2), {"conf": want, "cuda_initialized": False})


@pytest.mark.parametrize(("operator", "argv", "want"), CASES)
def test_a_torchrun_rank_sets_it_itself_before_cuda(environment, tmp_path, operator, argv, want):
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}.items():
        environment.setenv(name, value)
    if operator is not None:
        environment.setenv(CONF, operator)
    seen = []
    environment.setattr(
        service_main, "serve_torchrun_rank", lambda s, w: seen.append(what_this_process_sees())
    )
    run_main(environment, tmp_path, "--kv-gather", "2", *argv)
    assert seen == [{"conf": want, "cuda_initialized": False}]
