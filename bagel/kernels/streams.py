"""A second CUDA stream for the marker tokens' side of a generation forward.

The two marker rows run through the und expert: seven matmuls a layer that read all of its
weights for 4 rows (2 branches), bound by memory bandwidth (docs/benchmarks.md, "Where one
forward's GPU time goes"). The latent rows run through the gen expert at the same time, bound by compute. On one stream
they take turns; on two the marker work fills the gaps. Ordering between the streams is explicit
(`beside`, `join`); `BAGEL_MARKER_STREAM=0` keeps everything on one stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from bagel import envs


def wanted(x: Tensor) -> bool:
    """Whether a forward over `x` runs its marker work on a second stream: CUDA, not turned off."""
    return x.is_cuda and envs.switch_on(envs.MARKER_STREAM)


@contextmanager
def beside(side: torch.cuda.Stream | None, *inputs: Tensor) -> Iterator[None]:
    """Run the block on `side`, after all work queued so far on the current stream. `inputs`
    (made on the current stream) are marked as read by `side`, so their memory is not handed
    out again before `side` has read them. With `side` None, run it where we are."""
    if side is None:
        yield
        return
    side.wait_stream(torch.cuda.current_stream())
    for x in inputs:
        x.record_stream(side)
    with torch.cuda.stream(side):
        yield


def join(side: torch.cuda.Stream | None) -> None:
    """Make the current stream wait for all work queued on `side` so far."""
    if side is not None:
        torch.cuda.current_stream().wait_stream(side)
