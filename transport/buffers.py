"""Flat uint8 host buffers for received caches, optionally reused across requests.

Touching fresh memory costs more than copying into it on the CI VM (first-touch page faults run at
0.4-2 GB/s against ~18 GB/s for a warm memcpy), and pinned memory is slow to allocate, so a
service keeps released buffers in a `BufferPool` instead of allocating one per request, and
calls `tune_malloc` once so gRPC's own message buffers stay warm too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from typing import Protocol

import torch
from torch import Tensor


class Buffers(Protocol):
    """Where an assembler or a broadcast gets its flat buffer and gives it back."""

    def take(self, nbytes: int) -> Tensor: ...

    def give_back(self, buffer: Tensor) -> None: ...


class FreshBuffers:
    """A new buffer every time; giving one back just drops the reference."""

    def __init__(self, *, pin_memory: bool = False) -> None:
        self.pin_memory = pin_memory

    def take(self, nbytes: int) -> Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin_memory)

    def give_back(self, buffer: Tensor) -> None:
        del buffer


class BufferPool:
    """Reuses buffers given back, best fit first, keeping at most `max_idle_bytes` idle.

    A buffer must be given back only once nothing uses its views any more.
    """

    def __init__(self, max_idle_bytes: int = 2 << 30, *, pin_memory: bool = False) -> None:
        self.max_idle_bytes = max_idle_bytes
        self.pin_memory = pin_memory
        self._idle: list[Tensor] = []  # whole base buffers, oldest first
        self._lent: dict[int, Tensor] = {}  # data_ptr -> base buffer of each lent view
        self._lock = threading.Lock()

    @property
    def idle_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() for b in self._idle)

    def take(self, nbytes: int) -> Tensor:
        with self._lock:
            fits = [b for b in self._idle if b.numel() >= nbytes]
            base = min(fits, key=lambda b: b.numel()) if fits else None
            if base is not None:
                self._idle = [b for b in self._idle if b is not base]
        if base is None:
            base = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self.pin_memory)
        view = base[:nbytes]
        with self._lock:
            self._lent[view.data_ptr()] = base
        return view

    def give_back(self, buffer: Tensor) -> None:
        with self._lock:
            base = self._lent.pop(buffer.data_ptr(), None)
            if base is None:
                return  # not ours, or already given back
            self._idle.append(base)
            while sum(b.numel() for b in self._idle) > self.max_idle_bytes:
                self._idle.pop(0)


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def tune_malloc(
    *,
    mmap_threshold: int = 32 << 20,
    trim_threshold: int = 512 << 20,
    top_pad: int = 64 << 20,
) -> bool:
    """Make glibc keep freed heap memory instead of returning it to the OS at once; call once at
    process start. Returns False where glibc's `mallopt` is not available (nothing changes).

    By default glibc trims the heap whenever ~2 MiB at its top is free, so a stream of ~1 MiB
    messages keeps faulting in fresh pages; on the CI VM this halved loopback gRPC throughput, for
    bare byte streams and KV frames alike, and mixed message sizes made it worse.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    settings = (
        (_M_MMAP_THRESHOLD, mmap_threshold),
        (_M_TRIM_THRESHOLD, trim_threshold),
        (_M_TOP_PAD, top_pad),
    )
    return all(mallopt(param, value) == 1 for param, value in settings)
