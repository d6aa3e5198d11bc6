"""Rank 0's verified KV cache -> every rank of a process group, without pickle.

The source sends a fixed-size int64 header tensor (the layout), then the whole flat payload in
one `broadcast` (on GPU after one host-to-device copy); the other ranks allocate from the header
and rebuild the same views. Every collective waits at most `timeout`.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from transport.buffers import Buffers, FreshBuffers
from transport.errors import Fault, TransportError
from transport.layout import (
    CONTEXT_KINDS,
    DTYPE_TO_WIRE,
    MAX_CONTEXTS,
    WIRE_TO_DTYPE,
    ContextSpec,
    KVCache,
    KVLayout,
)

HEADER_LEN = 32
_MAGIC = 0x4B56_4341_4348_4531  # "KVCACHE1"
_FIXED = 7  # magic, dtype, layers, heads, head_dim, contexts, total bytes; then per context:
_PER_CONTEXT = 4  # kind, tokens, next RoPE position, prefix_of (-1: none)
assert _FIXED + _PER_CONTEXT * MAX_CONTEXTS <= HEADER_LEN
DEFAULT_TIMEOUT = timedelta(seconds=60)


def layout_to_tensor(layout: KVLayout) -> Tensor:
    """The fixed-size int64 header that describes `layout`."""
    if len(layout.contexts) > MAX_CONTEXTS:
        raise ValueError(f"at most {MAX_CONTEXTS} contexts fit the broadcast header")
    values = [
        _MAGIC,
        DTYPE_TO_WIRE[layout.dtype],
        layout.num_layers,
        layout.num_kv_heads,
        layout.head_dim,
        len(layout.contexts),
        layout.total_bytes,
    ]
    for c in layout.contexts:
        prefix_of = -1 if c.prefix_of is None else c.prefix_of
        values += [c.kind, c.num_tokens, c.next_rope_position, prefix_of]
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    header[: len(values)] = torch.tensor(values, dtype=torch.int64)
    return header


def layout_from_tensor(header: Tensor) -> KVLayout:
    """Inverse of `layout_to_tensor`; raises TransportError on a header it did not write."""
    v = header.tolist()
    n = v[5] if len(v) == HEADER_LEN else 0
    end = _FIXED + _PER_CONTEXT * n
    kinds = v[_FIXED:end:_PER_CONTEXT] if 0 < n <= MAX_CONTEXTS else []
    valid = (
        kinds
        and v[0] == _MAGIC
        and v[1] in WIRE_TO_DTYPE
        and set(kinds) <= CONTEXT_KINDS
        and len(set(kinds)) == len(kinds)  # each kind at most once
    )
    if not valid:
        raise TransportError(Fault.CONTRACT, "broadcast header is not a KV layout header")
    contexts = tuple(
        ContextSpec(v[i], v[i + 1], v[i + 2], None if v[i + 3] < 0 else v[i + 3])
        for i in range(_FIXED, end, _PER_CONTEXT)
    )
    try:
        layout = KVLayout(WIRE_TO_DTYPE[v[1]], v[2], v[3], v[4], contexts)
    except ValueError as e:
        raise TransportError(Fault.CONTRACT, f"broadcast header: {e}") from None
    if layout.total_bytes != v[6]:
        raise TransportError(Fault.CONTRACT, "broadcast header total does not match its layout")
    return layout


def _broadcast(
    tensor: Tensor, src: int, group: dist.ProcessGroup | None, timeout: timedelta, what: str
) -> None:
    work = dist.broadcast(tensor, group=group, group_src=src, async_op=True)
    try:
        work.wait(timeout=timeout)
    except RuntimeError as e:  # gloo and NCCL report a timeout or a lost peer this way
        raise TransportError(
            Fault.UNAVAILABLE,
            f"broadcast of the KV {what} did not complete within "
            f"{timeout.total_seconds():g} s: {e}",
        ) from e


def broadcast_kv(
    cache: KVCache | None,
    *,
    group: dist.ProcessGroup | None = None,
    src: int = 0,
    device: torch.device | str | None = None,
    timeout: timedelta = DEFAULT_TIMEOUT,
    buffers: Buffers | None = None,
) -> KVCache:
    """Give every rank of `group` the cache that group rank `src` holds.

    On `src` pass the cache, elsewhere None. The result lives on `device` (default CPU); on the
    source it is `cache` itself when already there. Other ranks take CPU buffers from `buffers`.
    Raises TransportError(UNAVAILABLE) when a collective does not finish within `timeout`.
    """
    rank = dist.get_rank(group)
    target = torch.device(device) if device is not None else torch.device("cpu")
    if rank == src:
        if cache is None:
            raise ValueError("the source rank must pass the cache")
        header = layout_to_tensor(cache.layout).to(target)
    else:
        header = torch.zeros(HEADER_LEN, dtype=torch.int64, device=target)
    _broadcast(header, src, group, timeout, "header")
    layout = layout_from_tensor(header.cpu())

    if rank == src:
        assert cache is not None
        if cache.flat.device == target:
            result = cache
        else:
            result = KVCache.wrap(layout, cache.flat.to(target))  # the one host-to-device copy
    elif target.type == "cpu":
        pool = buffers if buffers is not None else FreshBuffers()
        result = KVCache.wrap(layout, pool.take(layout.total_bytes), on_release=pool.give_back)
    else:
        result = KVCache.wrap(
            layout, torch.empty(layout.total_bytes, dtype=torch.uint8, device=target)
        )
    if layout.total_bytes:
        try:
            _broadcast(result.flat, src, group, timeout, f"payload ({layout.total_bytes} bytes)")
        except TransportError:
            if rank != src:
                result.release()
            raise
    return result
