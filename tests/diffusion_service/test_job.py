"""The rank message: rank 0 sends a command and, for a new job, every `GenerationParams` field;
every rank of a real 4-rank gloo group gets back exactly what was sent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from diffusion_service.job import Command, JobSpec, RankMessage, receive_message, send_message
from serving.params import DBCache, GenerationParams, TeaCache
from tests.helpers.ranks import run_ranks
from tests.serving.examples import EVERY_FIELD, fields_left_at_default

ROOT = Path(__file__).resolve().parents[2]

JOBS = [
    JobSpec(7, EVERY_FIELD),
    JobSpec(8, GenerationParams(seed=0)),  # all defaults: zero and "unset" must not blur
    JobSpec(9, GenerationParams(cache=TeaCache(rel_l1_threshold=0.5, taylorseer_order=1), seed=1)),
    JobSpec(2**62, GenerationParams(cache=DBCache(), seed=2**63 - 1)),
]


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0)


def _exchange(rank: int, world: int) -> dict[str, torch.Tensor]:
    """Rank 0 sends each job then a heartbeat and a shutdown; every rank returns what it holds
    afterwards (rank 0: what it sent), job by job, as the params' bytes."""
    out = {}
    messages = [RankMessage(Command.NEW_JOB, job) for job in JOBS]
    messages += [RankMessage(Command.HEARTBEAT), RankMessage(Command.SHUTDOWN)]
    for i, message in enumerate(messages):
        if rank == 0:
            send_message(message, group=None)
            got = message
        else:
            got = receive_message(group=None)
        out[f"command{i}"] = torch.tensor([int(got.command)])
        if got.job is not None:
            out[f"job_id{i}"] = torch.tensor([got.job.job_id])
            out[f"params{i}"] = _as_tensor(got.job.params.to_bytes())
    return out


def test_every_field_reaches_every_rank_of_a_4_rank_group_unchanged():
    assert fields_left_at_default(EVERY_FIELD) == []
    results = run_ranks(4, _exchange)
    for rank, got in enumerate(results):
        for i, job in enumerate(JOBS):
            assert int(got[f"command{i}"]) == Command.NEW_JOB
            assert int(got[f"job_id{i}"]) == job.job_id, (rank, i)
            received = GenerationParams.from_bytes(got[f"params{i}"].numpy().tobytes())
            assert received == job.params, (rank, i)
        assert int(got[f"command{len(JOBS)}"]) == Command.HEARTBEAT
        assert int(got[f"command{len(JOBS) + 1}"]) == Command.SHUTDOWN
        assert f"params{len(JOBS)}" not in got and f"job_id{len(JOBS) + 1}" not in got


def _send_params(rank: int, world: int, data: bytes) -> dict[str, torch.Tensor]:
    """Rank 0 sends the params in `data` as the diffusion service does; every rank returns the
    params it holds afterwards, as bytes."""
    if rank == 0:
        job = JobSpec(1, GenerationParams.from_bytes(data))
        send_message(RankMessage(Command.NEW_JOB, job), group=None)
    else:
        job = receive_message(group=None).job
    return {"params": _as_tensor(job.params.to_bytes())}


def params_on_every_rank(data: bytes, world: int = 4) -> list[GenerationParams]:
    """The params each rank of a `world`-rank gloo group holds after rank 0 sent `data`."""
    results = run_ranks(world, _send_params, data)
    return [GenerationParams.from_bytes(r["params"].numpy().tobytes()) for r in results]


def params_on_every_rank_in_a_fresh_process(data: bytes, world: int = 4) -> list[bytes]:
    """`params_on_every_rank` for a caller that must not fork (a process running gRPC threads):
    the ranks are forked from a new interpreter instead. Returns each rank's params bytes."""
    run = subprocess.run(
        [sys.executable, "-m", "tests.diffusion_service.test_job", str(world)],
        input=data.hex(),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return [bytes.fromhex(line) for line in run.stdout.split()]


def test_the_params_reach_every_rank_from_a_fresh_process_too():
    data = EVERY_FIELD.to_bytes()
    assert params_on_every_rank(data) == [EVERY_FIELD] * 4
    assert params_on_every_rank_in_a_fresh_process(data, world=2) == [data] * 2


if __name__ == "__main__":
    for params in params_on_every_rank(bytes.fromhex(sys.stdin.read()), int(sys.argv[1])):
        print(params.to_bytes().hex())
