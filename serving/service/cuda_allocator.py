"""The CUDA caching allocator's configuration of a service process (`--cuda-allocator`):
expandable segments unless the operator's environment configures the allocator itself.

torch reads its allocator configuration from the environment once, when the allocator first
starts, so `configure_cuda_allocator` runs before the process's first CUDA call; ranks forked
later inherit the environment, and every process torchrun starts runs it itself. Expandable
segments grow one mapping instead of caching blocks of the sizes first asked for, which keeps
the memory reserved beside the tensors small (docs/benchmarks.md, "Memory of a diffusion rank").
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping
from typing import Any

from serving.flags import option

log = logging.getLogger(__name__)

# --cuda-allocator's choices, each with what it writes to the environment (None: nothing).
ALLOCATOR_CONF: dict[str, str | None] = {
    "expandable": "expandable_segments:True",
    "default": None,
}
# torch reads the first; the second is its older name, still read when the first is unset.
CONF_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
SET_VARIABLE = "PYTORCH_CUDA_ALLOC_CONF"


def cuda_allocator_option() -> Any:
    """The `--cuda-allocator` field of a service that runs on CUDA."""
    return option(
        "CUDA caching allocator: expandable (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, "
        "less memory reserved beside the tensors) or default (torch's); a PYTORCH_CUDA_ALLOC_CONF "
        "or PYTORCH_ALLOC_CONF in the environment wins over either",
        default="expandable",
        choices=tuple(ALLOCATOR_CONF),
    )


def configure_cuda_allocator(choice: str, env: MutableMapping[str, str] = os.environ) -> None:
    """Write `choice`'s allocator configuration to `env` unless it already names one (the
    operator's value wins, and is logged). Call it before the process's first CUDA call."""
    for name in CONF_VARIABLES:
        if name in env:
            log.info(
                "CUDA allocator: %s=%s from the environment (--cuda-allocator %s not applied)",
                name,
                env[name],
                choice,
            )
            return
    conf = ALLOCATOR_CONF[choice]
    if conf is None:
        log.info("CUDA allocator: torch's default (--cuda-allocator default)")
        return
    env[SET_VARIABLE] = conf
    log.info("CUDA allocator: %s=%s (--cuda-allocator %s)", SET_VARIABLE, conf, choice)
