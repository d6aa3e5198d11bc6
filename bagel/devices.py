"""Where the model runs: its dtype per device (fp32 on the CPU, the reference precision; bf16 on
CUDA), and whether this torch and host can run it where asked (a one-line fault, or None)."""

from __future__ import annotations

import torch


def default_dtype(device: str | torch.device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def device_fault(device: str, gpus_needed: int = 1, flag: str = "--device") -> str | None:
    """Why `device` ("cpu" or "cuda") cannot give `gpus_needed` GPUs here, or None if it can."""
    if device != "cuda":
        return None
    if torch.version.cuda is None:
        return (
            f"{flag} cuda: this torch ({torch.__version__}) is a CPU-only build; install a CUDA "
            f"build (README, 'Set-up') or use {flag} cpu"
        )
    visible = torch.cuda.device_count()
    if visible < gpus_needed:
        return (
            f"{flag} cuda: {gpus_needed} GPU(s) needed (one per rank), {visible} visible "
            "(check CUDA_VISIBLE_DEVICES and the driver)"
        )
    return None
