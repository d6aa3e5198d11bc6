"""Replaying a fixed-shape forward as a CUDA graph: one launch instead of thousands of small
kernel launches from Python, which otherwise bound a BAGEL forward on the CPU side.

Generic over the function captured: it knows nothing of what the forward computes or of any
collectives inside it (those must be capturable, as NCCL's are).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

log = logging.getLogger(__name__)


class GraphedCall:
    """`fn(*inputs) -> Tensor` captured once for inputs of fixed shapes; later calls copy the
    new inputs into the captured buffers and replay. The returned tensor is overwritten by the
    next call: consume or copy it first."""

    def __init__(
        self, fn: Callable[..., Tensor], inputs: tuple[Tensor, ...], pool=None, warmup: int = 2
    ) -> None:
        # The graph reads the memory of every tensor `fn` reached during capture; keeping `fn`
        # keeps the tensors it binds alive (and their memory unreused) as long as the graph.
        self.fn = fn
        self.inputs = tuple(x.clone() for x in inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            for _ in range(warmup):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        # The warm-up's activations went back to the allocator's cache, where they would stay
        # reserved beside the graph's own pool (~2 GiB for the VAE decode at 1024²): hand them
        # back to the driver before the capture takes its pool.
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = fn(*self.inputs)

    def __call__(self, *inputs: Tensor) -> Tensor:
        for buffer, x in zip(self.inputs, inputs, strict=True):
            buffer.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.output


def graph_or_eager(
    fn: Callable[..., Tensor], inputs: tuple[Tensor, ...], pool=None
) -> Callable[..., Tensor]:
    """A `GraphedCall` when the inputs live on a GPU and capture works; else `fn` itself."""
    if not inputs[0].is_cuda:
        return fn
    try:
        return GraphedCall(fn, inputs, pool)
    except Exception as e:  # noqa: BLE001 - an uncapturable forward still runs, only slower
        log.warning("CUDA graph capture failed, running eagerly: %s", e)
        torch.cuda.synchronize()
        return fn
