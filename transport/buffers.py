"""Flat uint8 host buffers for received caches, optionally reused across requests.

Touching fresh memory costs more than copying into it (first-touch page faults are several times
slower than a warm memcpy: docs/benchmarks.md, "Figures behind code defaults"), and pinned memory is slow to allocate, so a
service keeps released buffers in a `BufferPool` instead of allocating one per request (and gives
memory above a bound back once the pool has been idle a while), and calls `tune_malloc` once so
gRPC's own message buffers stay warm too. (`transport.admission` bounds the bytes that all
uploads in flight hold together.)
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
    """Reuses buffers given back, best fit first, keeping at most `max_idle_bytes` idle; once
    nothing has been lent for `release_after_s`, it keeps at most `keep_idle_bytes` (default: all
    it may keep), dropping the largest buffers first.

    A buffer must be given back only once nothing uses its views any more.
    """

    def __init__(
        self,
        max_idle_bytes: int = 2 << 30,
        *,
        pin_memory: bool = False,
        keep_idle_bytes: int | None = None,
        release_after_s: float = 10.0,
    ) -> None:
        self.max_idle_bytes = max_idle_bytes
        self.keep_idle_bytes = max_idle_bytes if keep_idle_bytes is None else keep_idle_bytes
        self.release_after_s = release_after_s
        self.pin_memory = pin_memory
        self._idle: list[Tensor] = []  # whole base buffers, oldest first
        self._lent: dict[int, Tensor] = {}  # data_ptr -> base buffer of each lent view
        self._lock = threading.Lock()
        self._uses = 0  # counts `take` calls: a release timer from before a take does nothing
        self._timer: threading.Timer | None = None

    @property
    def lent_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() for b in self._lent.values())

    @property
    def idle_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() for b in self._idle)

    def take(self, nbytes: int) -> Tensor:
        with self._lock:
            self._uses += 1
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
            if not self._lent and sum(b.numel() for b in self._idle) > self.keep_idle_bytes:
                self._schedule_release()

    def release_idle(self, keep_bytes: int | None = None) -> int:
        """Drop idle buffers, largest first, until at most `keep_bytes` (default
        `keep_idle_bytes`) stay; returns the bytes dropped."""
        keep = self.keep_idle_bytes if keep_bytes is None else keep_bytes
        dropped = 0
        with self._lock:
            self._idle.sort(key=lambda b: b.numel())
            while self._idle and sum(b.numel() for b in self._idle) > keep:
                dropped += self._idle.pop().numel()
        return dropped

    def _schedule_release(self) -> None:  # with the lock held
        if self._timer is not None:
            self._timer.cancel()
        uses = self._uses

        def release() -> None:
            with self._lock:
                quiet = self._uses == uses and not self._lent
            if quiet:
                self.release_idle()

        self._timer = threading.Timer(self.release_after_s, release)
        self._timer.daemon = True
        self._timer.start()


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
    messages keeps faulting in fresh pages, which costs loopback gRPC much of its throughput, for
    bare byte streams and KV frames alike (docs/benchmarks.md, KV transport).
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
