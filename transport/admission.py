"""Admission of KV uploads: the bytes all uploads in flight may hold together, and who gives way.

An upload reserves its declared size when its header arrives (before anything is allocated, so
memory stays bounded by the budget) and gives it back when it ends, however it ends. Declared
bytes alone would let a few peers that announce large caches and then send nothing hold the whole
budget for the idle timeout, again and again. So an upload keeps its room only while it moves:
when a new one does not fit, the uploads that have sent no frame for `stall_s`, or that send
slower than `min_rate` bytes per second on average once `stall_s` has passed, are evicted,
stalest first, until it fits (they end RESOURCE_EXHAUSTED, naming why). A newcomer that still
does not fit may wait up to `stall_s` for room (the holders may become stale meanwhile) before it
is refused RESOURCE_EXHAUSTED itself.

What a sender can still do (docs/reliability.md): hold room as long as it keeps sending at
`min_rate` or faster, so holding the whole budget costs it that rate per upload.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from transport.errors import Fault, TransportError

DEFAULT_STALL_S = 1.0
DEFAULT_MIN_RATE = 4 << 20  # bytes per second, averaged from the header on


@dataclass(eq=False)
class Upload:
    """One upload's claim on the budget: what it reserved, what has arrived and when. `evict`
    (set by its receiver) ends it from outside; the budget calls it without its lock."""

    reserved: int = 0  # 0 once given back (or evicted)
    declared: int = 0
    received: int = 0
    admitted_at: float = 0.0
    last_frame_at: float = 0.0
    evict: Callable[[TransportError], None] | None = field(default=None, repr=False)

    def stale_for(self, now: float, stall_s: float, min_rate: float) -> float:
        """How long this upload has been stale (<= 0: it is not): silent past `stall_s`, or
        behind `min_rate` once `stall_s` has passed since it was admitted."""
        silent = now - self.last_frame_at - stall_s
        due_by = self.admitted_at + stall_s + self.received / min_rate  # when min_rate ran out
        return max(silent, now - due_by)


class UploadBudget:
    """The bytes that all uploads in flight may hold together; see the module's docstring."""

    def __init__(
        self,
        max_bytes: int,
        *,
        stall_s: float = DEFAULT_STALL_S,
        min_rate: float = DEFAULT_MIN_RATE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_bytes = max_bytes
        self.stall_s = stall_s
        self.min_rate = min_rate
        self.clock = clock
        self.evicted = 0  # uploads evicted so far
        self._uploads: set[Upload] = set()
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return self._held

    @property
    def uploads(self) -> int:
        """Uploads holding a reservation now."""
        with self._lock:
            return len(self._uploads)

    def reserve(self, nbytes: int, upload: Upload | None = None) -> Upload:
        """Reserve `nbytes` for `upload` (a new one if None), evicting stale uploads if that makes
        room; BUSY (RESOURCE_EXHAUSTED) if it cannot."""
        upload = upload if upload is not None else Upload()
        if not self.try_reserve(nbytes, upload):
            raise self.busy(nbytes)
        return upload

    def busy(self, nbytes: int) -> TransportError:
        """The refusal of a reservation of `nbytes` that does not fit."""
        with self._lock:
            held = self._held
        return TransportError(
            Fault.BUSY,
            f"uploads in flight already hold {held} bytes; {nbytes} more would exceed the "
            f"limit of {self.max_bytes} bytes for all uploads in flight: retry later",
        )

    def try_reserve(self, nbytes: int, upload: Upload) -> bool:
        now = self.clock()
        with self._lock:
            victims: list[tuple[Upload, float]] = []
            if self._held + nbytes > self.max_bytes:
                stale = [(u, u.stale_for(now, self.stall_s, self.min_rate)) for u in self._uploads]
                stale = sorted((p for p in stale if p[1] > 0), key=lambda p: -p[1])
                room = self.max_bytes - self._held
                for victim, stale_s in stale:
                    if room >= nbytes:
                        break
                    victims.append((victim, stale_s))
                    room += victim.reserved
                if room < nbytes:
                    return False
                for victim, _ in victims:
                    self._drop(victim)
                self.evicted += len(victims)
            self._held += nbytes
            upload.reserved = upload.declared = nbytes
            upload.admitted_at = upload.last_frame_at = now
            self._uploads.add(upload)
        for victim, stale_s in victims:
            if victim.evict is not None:
                victim.evict(
                    TransportError(
                        Fault.EVICTED,
                        f"upload evicted after {stale_s + self.stall_s:.1f} s without progress "
                        f"({victim.received} of {victim.declared} payload bytes arrived; "
                        f"uploads must send a frame every {self.stall_s:g} s and "
                        f"{self.min_rate / (1 << 20):g} MiB/s on average while others need "
                        f"their room): retry",
                    )
                )
        return True

    def progress(self, upload: Upload, nbytes: int) -> None:
        """`nbytes` more arrived for `upload` (a frame, even an empty one, counts as a sign of
        life)."""
        upload.received += nbytes
        upload.last_frame_at = self.clock()

    def release(self, upload: Upload) -> None:
        """Give back what `upload` holds; once only (later calls do nothing)."""
        with self._lock:
            if upload in self._uploads:
                self._drop(upload)

    def _drop(self, upload: Upload) -> None:  # with the lock held
        self._uploads.discard(upload)
        self._held = max(self._held - upload.reserved, 0)
        upload.reserved = 0
