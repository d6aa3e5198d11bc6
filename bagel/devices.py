"""The model's dtype per device: fp32 on the CPU (the reference precision), bf16 on CUDA."""

from __future__ import annotations

import torch


def default_dtype(device: str | torch.device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
