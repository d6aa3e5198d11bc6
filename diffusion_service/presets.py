"""The diffusion service's presets (`--preset`): named quality/speed trade-offs, what each sets
in one table, `PRESETS`. They are applied once, when the flags are read
(`diffusion_service.settings.parse_settings`): a flag the command line gives wins over its
preset's value, and the layout flags (`--ulysses`, `--ring`,
`--cfg-parallel`, `--kv-gather`, `--sp-attention`) count as one setting, the layout.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from bagel.network.fp8 import LinearPrecision
from diffusion_service.parallel.config import ParallelConfig
from serving.flags import FieldPath

LAYOUT_FIELD = "parallel"  # the settings' field of the layout flags

# The fastest layout measured for each number of GPUs, text-to-image at 1024² (docs/benchmarks.md:
# "KV all-gather, end to end" for 2, "Sequence parallelism on GPUs, end to end" for 4, the one
# 4-GPU layout measured there).
FASTEST_LAYOUTS: dict[int, ParallelConfig] = {
    1: ParallelConfig(),
    2: ParallelConfig(kv_gather=2),
    4: ParallelConfig(ulysses=2, ring=2),
}


@dataclass(frozen=True)
class Preset:
    """What one preset sets; None leaves the flag's own default."""

    summary: str  # for --help
    linear_precision: LinearPrecision | None = None
    layout: Callable[[int, bool], ParallelConfig] | None = None  # (ranks, torchrun) -> layout


def fastest_layout(ranks: int, torchrun: bool) -> ParallelConfig:
    """The fastest measured layout for `ranks` GPUs. Our own ranks take the largest measured
    count that fits; torchrun's world is given, and one no layout was measured for is refused."""
    if torchrun:
        if ranks not in FASTEST_LAYOUTS:
            raise ValueError(
                f"--preset fast: no layout is measured for the {ranks} ranks torchrun started "
                f"(measured: {', '.join(map(str, FASTEST_LAYOUTS))}); give the layout flags "
                "(--ulysses, --ring, --cfg-parallel, --kv-gather)"
            )
        return FASTEST_LAYOUTS[ranks]
    return FASTEST_LAYOUTS[max(n for n in FASTEST_LAYOUTS if n <= max(ranks, 1))]


# No step cache in `fast`: it would take one whose worst image stays >= 40 dB from the uncached
# bf16 image on the trained tiny checkpoint, and the best DBCache row of docs/quality.md ("Step
# caching", `dbcache:fn=1,warmup=8,threshold=0.05`) keeps 29.4 dB.
PRESETS: dict[str, Preset] = {
    "exact": Preset(
        "bf16 linears, no step cache, the layout the flags give: images as the model computes "
        "them (the flags' defaults)"
    ),
    "fast": Preset(
        "FP8 linears (faster where the GPU has FP8 tensor cores, a little less exact: "
        "docs/benchmarks.md, 'FP8 linear layers'), the fastest measured layout for the GPUs "
        "present (1: one rank; 2: --kv-gather 2; 4: --ulysses 2 --ring 2; under torchrun: for "
        "its world), no step cache",
        linear_precision="fp8",
        layout=fastest_layout,
    ),
}
DEFAULT_PRESET = "exact"
PRESET_HELP = (
    "a quality/speed trade-off, applied to every setting it names that no flag gives: "
    + "; ".join(f"{name}: {preset.summary}" for name, preset in PRESETS.items())
)


def ranks_present(device: str, torchrun: bool, env: Mapping[str, str] = os.environ) -> int:
    """The ranks a layout may take: torchrun's world, else the GPUs visible (one on the CPU)."""
    if torchrun:
        return int(env["WORLD_SIZE"])
    return torch.cuda.device_count() if device == "cuda" else 1


def preset_changes(
    name: str, given: frozenset[FieldPath], device: str, torchrun: bool
) -> dict[str, Any]:
    """The settings' fields preset `name` sets, given the fields the command line named."""
    preset = PRESETS[name]
    changes: dict[str, Any] = {}
    if preset.linear_precision is not None and ("linear_precision",) not in given:
        changes["linear_precision"] = preset.linear_precision
    if preset.layout is not None and not any(path[0] == LAYOUT_FIELD for path in given):
        changes[LAYOUT_FIELD] = preset.layout(ranks_present(device, torchrun), torchrun)
    return changes
