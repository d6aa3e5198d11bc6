"""What rank 0 tells the other ranks about a job, as a fixed-size int64 tensor (never pickle).

Floats travel as the bits of an IEEE double reinterpreted as int64, so they arrive exactly.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import torch
from torch import Tensor

from bagel.params import RENORM_TYPES, GenerationParams

JOB_WORDS = 16


class Command(enum.IntEnum):
    HEARTBEAT = 0  # rank 0 is alive and idle; keeps the workers' receive inside its timeout
    NEW_JOB = 1
    SHUTDOWN = 2


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _bits_float(n: int) -> float:
    return struct.unpack("<d", struct.pack("<q", n))[0]


@dataclass(frozen=True)
class JobSpec:
    job_id: int
    params: GenerationParams
    return_latents_only: bool = False

    def encode(self, command: Command = Command.NEW_JOB) -> Tensor:
        p = self.params
        words = [
            int(command),
            self.job_id,
            p.height,
            p.width,
            p.num_timesteps,
            p.seed,
            RENORM_TYPES.index(p.cfg_renorm_type),
            int(self.return_latents_only),
            _float_bits(p.timestep_shift),
            _float_bits(p.cfg_text_scale),
            _float_bits(p.cfg_img_scale),
            _float_bits(p.cfg_interval[0]),
            _float_bits(p.cfg_interval[1]),
            _float_bits(p.cfg_renorm_min),
        ]
        return torch.tensor(words + [0] * (JOB_WORDS - len(words)), dtype=torch.int64)

    @classmethod
    def decode(cls, words: Tensor) -> JobSpec:
        w = [int(x) for x in words.tolist()]
        params = GenerationParams(
            height=w[2],
            width=w[3],
            num_timesteps=w[4],
            seed=w[5],
            cfg_renorm_type=RENORM_TYPES[w[6]],
            timestep_shift=_bits_float(w[8]),
            cfg_text_scale=_bits_float(w[9]),
            cfg_img_scale=_bits_float(w[10]),
            cfg_interval=(_bits_float(w[11]), _bits_float(w[12])),
            cfg_renorm_min=_bits_float(w[13]),
        )
        return cls(job_id=w[1], params=params, return_latents_only=bool(w[7]))


def command_tensor(command: Command) -> Tensor:
    words = torch.zeros(JOB_WORDS, dtype=torch.int64)
    words[0] = int(command)
    return words


def command_of(words: Tensor) -> Command:
    return Command(int(words[0]))
