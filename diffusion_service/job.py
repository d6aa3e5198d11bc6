"""What rank 0 tells the other ranks: a command, and for a new job its id and the request's
`GenerationParams` as serialized protobuf bytes (never pickle).

A message is two broadcasts on the control group: a fixed int64 head `[command, job_id, length]`,
then, when `length > 0`, `length` uint8 bytes. Heartbeats and shutdown send the head alone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from serving.params import GenerationParams

HEAD_WORDS = 3
MAX_PARAMS_BYTES = 1 << 20  # a request's params are ~100 bytes; anything near this is a bug


class Command(enum.IntEnum):
    HEARTBEAT = 0  # rank 0 is alive and idle; keeps the workers' receive inside its timeout
    NEW_JOB = 1
    SHUTDOWN = 2


@dataclass(frozen=True)
class JobSpec:
    job_id: int
    params: GenerationParams


@dataclass(frozen=True)
class RankMessage:
    command: Command
    job: JobSpec | None = None


def send_message(
    message: RankMessage, group: dist.ProcessGroup | None, timeout: timedelta | None = None
) -> None:
    """Rank 0: broadcast `message` to every rank of `group`."""
    job = message.job
    payload = job.params.to_bytes() if job is not None else b""
    if len(payload) > MAX_PARAMS_BYTES:
        raise ValueError(f"job parameters of {len(payload)} bytes exceed {MAX_PARAMS_BYTES}")
    head = torch.tensor(
        [int(message.command), job.job_id if job is not None else 0, len(payload)],
        dtype=torch.int64,
    )
    _broadcast(head, group, timeout)
    if payload:
        _broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8), group, timeout)


def receive_message(
    group: dist.ProcessGroup | None, timeout: timedelta | None = None
) -> RankMessage:
    """Ranks 1..N-1: the next message rank 0 broadcasts on `group`."""
    head = torch.zeros(HEAD_WORDS, dtype=torch.int64)
    _broadcast(head, group, timeout)
    command, job_id, length = (int(x) for x in head.tolist())
    if not 0 <= length <= MAX_PARAMS_BYTES:
        raise ValueError(f"rank message announces {length} bytes of parameters")
    command = Command(command)
    if command is not Command.NEW_JOB:
        return RankMessage(command)
    payload = torch.empty(length, dtype=torch.uint8)
    if length:
        _broadcast(payload, group, timeout)
    params = GenerationParams.from_bytes(payload.numpy().tobytes())
    return RankMessage(command, JobSpec(job_id, params))


def _broadcast(tensor: Tensor, group: dist.ProcessGroup | None, timeout: timedelta | None) -> None:
    work = dist.broadcast(tensor, group=group, group_src=0, async_op=True)
    if timeout is None:
        work.wait()
    else:
        work.wait(timeout=timeout)
