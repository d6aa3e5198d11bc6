"""Every environment switch the model reads, declared once: its name, its default and what it
does. Code asks these functions, never `os.environ`, so the list below is the whole set.

| variable | default | effect |
|---|---|---|
| `BAGEL_FUSED_KERNELS` | `1` | `0`: the decoder layers' elementwise chains (QK-norm + RoPE, RMSNorm, SwiGLU's activation) run as eager PyTorch instead of Triton kernels on CUDA |
| `BAGEL_FP8_ATTENTION_KERNEL` | `1` | `0`: FP8 attention (`--attention-precision fp8`) runs its plain-PyTorch reference on CUDA instead of the Triton kernel (same quantization, far slower; for checking the kernel) |
| `BAGEL_MARKER_STREAM` | `1` | `0`: the image markers' und-expert work runs on the forward's own CUDA stream instead of a second one |
"""

from __future__ import annotations

import os

FUSED_KERNELS = "BAGEL_FUSED_KERNELS"
FP8_ATTENTION_KERNEL = "BAGEL_FP8_ATTENTION_KERNEL"
MARKER_STREAM = "BAGEL_MARKER_STREAM"
SWITCHES = {FUSED_KERNELS: "1", FP8_ATTENTION_KERNEL: "1", MARKER_STREAM: "1"}  # name -> default


def switch_on(name: str) -> bool:
    """Whether the declared switch `name` is on: anything but `0` is on."""
    return os.environ.get(name, SWITCHES[name]) != "0"
