"""Collective calls whose name changed across the torch versions we run on (2.11 on the GPU
machines, 2.13 here)."""

from __future__ import annotations

import torch.distributed as dist

# torch 2.13 deprecates all_gather_into_tensor in favour of all_gather_single.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
