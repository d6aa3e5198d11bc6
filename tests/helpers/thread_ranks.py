"""Ranks as threads of one process, for tests that mutation testing must see.

`ThreadWorld` stands in for the `torch.distributed` calls of `diffusion_service.parallel` and
`step_cache.collective`: groups are tuples of global ranks, collectives meet at a per-group
barrier and copy each other's tensors, point-to-point sends go through one queue per
(sender, receiver) pair. Forked ranks (`tests/helpers/ranks.py`) run the real gloo backend; these
run the same code in one process, so mutmut can tell which tests call a function.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

# Long enough for a slow shared machine, short enough that a rank left waiting fails the test.
WAIT_S = 20.0


@dataclass(frozen=True)
class ThreadGroup:
    """A process group: its members' global ranks, group rank `i` being `ranks[i]`."""

    ranks: tuple[int, ...]


@dataclass(frozen=True)
class WorldGroup(ThreadGroup):
    """The whole world; its CPU backend's options carry the timeout given to `ThreadWorld`, where
    torch keeps the one given to `init_process_group`."""

    timeout: timedelta | None = None

    def _get_backend(self, device: torch.device) -> Any:
        if device.type != "cpu":
            raise RuntimeError(f"no backend for {device.type} in a gloo world")
        return SimpleNamespace(options=SimpleNamespace(_timeout=self.timeout))


@dataclass(frozen=True)
class P2POp:
    """One operation of `batch_isend_irecv`: `peer` is the global rank, `group_peer` the same rank
    in `group` (None: the whole world), whichever of the two the caller named."""

    op: Callable
    tensor: Tensor
    peer: int
    group: ThreadGroup | None
    group_peer: int


class _Received:
    def __init__(self, box: queue.Queue, tensor: Tensor) -> None:
        self.box, self.tensor = box, tensor

    def wait(self) -> bool:
        self.tensor.copy_(self.box.get(timeout=WAIT_S))
        return True


class _Done:
    def wait(self) -> bool:
        return True


class ThreadWorld:
    """`world` ranks; `run(fn)` calls `fn(rank)` on one thread per rank and returns the results
    in rank order (an exception on any rank is raised, the lowest rank's first)."""

    def __init__(self, world: int, timeout: timedelta | None = None) -> None:
        self.world = world
        self.group = SimpleNamespace(WORLD=WorldGroup(tuple(range(world)), timeout))
        self._local = threading.local()
        self._lock = threading.Lock()
        self._barriers: dict[tuple[int, ...], threading.Barrier] = {}
        self._slots: dict[tuple[int, ...], list[Any]] = {}
        self._boxes: dict[tuple[int, int], queue.Queue] = {}
        self.new_groups: list[tuple[int, ...]] = []  # every new_group call of rank 0, in order
        self.new_group_timeouts: list[Any] = []  # the timeout of each, in the same order
        self.all_reduces = 0  # all_reduce calls, summed over the ranks
        self.p2p: list[tuple[str, int, int]] = []  # (op name, rank, global peer) of every P2POp

    # ---- running ------------------------------------------------------------------------

    def run(self, fn: Callable[[int], Any]) -> list[Any]:
        results: list[Any] = [None] * self.world
        errors: list[BaseException | None] = [None] * self.world

        def rank_main(rank: int) -> None:
            self._local.rank = rank
            try:
                results[rank] = fn(rank)
            except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
                errors[rank] = e
                for barrier in list(self._barriers.values()):
                    barrier.abort()  # the other ranks stop waiting for this one

        threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(3 * WAIT_S)
        if any(t.is_alive() for t in threads):
            raise AssertionError("a thread rank did not finish")
        for error in errors:
            if error is not None and not isinstance(error, threading.BrokenBarrierError):
                raise error
        for error in errors:
            if error is not None:
                raise error
        return results

    # ---- what torch.distributed offers --------------------------------------------------

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def get_rank(self, group: ThreadGroup | None = None) -> int:
        me = self._local.rank
        return me if group is None else group.ranks.index(me)

    def get_world_size(self, group: ThreadGroup | None = None) -> int:
        return self.world if group is None else len(group.ranks)

    def get_process_group_ranks(self, group: ThreadGroup) -> list[int]:
        return list(group.ranks)

    def new_group(self, ranks: list[int], timeout: Any = None) -> ThreadGroup:
        if self._local.rank == 0:
            self.new_groups.append(tuple(ranks))
            self.new_group_timeouts.append(timeout)
        return ThreadGroup(tuple(ranks))

    def all_gather_into_tensor(
        self, output: Tensor, input: Tensor, group: ThreadGroup | None = None
    ) -> None:
        """Group rank `i`'s `input` lands in chunk `i` of `output` (leading dim)."""
        parts = self._exchange(group, input)
        output.copy_(torch.cat([p.reshape(-1) for p in parts]).view(output.shape))
        self._barrier(group)

    def all_to_all_single(
        self, output: Tensor, input: Tensor, group: ThreadGroup | None = None
    ) -> None:
        """Chunk `i` of every rank's `input` (leading dim) goes to group rank `i`."""
        parts = self._exchange(group, input)
        me = self.get_rank(group)
        output.copy_(torch.stack([p.chunk(len(parts))[me] for p in parts]).view(output.shape))
        self._barrier(group)

    def all_reduce(self, tensor: Tensor, group: ThreadGroup | None = None) -> None:
        with self._lock:
            self.all_reduces += 1
        parts = self._exchange(group, tensor)
        tensor.copy_(torch.stack(parts).sum(0))
        self._barrier(group)

    def isend(self, tensor: Tensor, peer: int, group: ThreadGroup | None = None) -> _Done:
        self._box(self._local.rank, peer).put(tensor.clone())
        return _Done()

    def irecv(self, tensor: Tensor, peer: int, group: ThreadGroup | None = None) -> _Received:
        return _Received(self._box(peer, self._local.rank), tensor)

    def P2POp(  # noqa: N802 - stands in for the class torch.distributed.P2POp
        self,
        op: Callable,
        tensor: Tensor,
        peer: int | None = None,
        group: ThreadGroup | None = None,
        tag: int = 0,
        group_peer: int | None = None,
    ) -> P2POp:
        """The peer named by exactly one of its global rank `peer` and its rank `group_peer` in
        `group`, as torch takes it; the other is derived from it."""
        members = self._members(group)
        if (peer is None) == (group_peer is None):
            raise ValueError("name the peer by exactly one of peer and group_peer")
        if group_peer is not None:
            peer = members[group_peer]
        if peer not in members:
            raise ValueError(f"rank {peer} is not in the group {members}")
        with self._lock:
            self.p2p.append((op.__name__, self._local.rank, peer))
        return P2POp(op, tensor, peer, group, members.index(peer))

    def batch_isend_irecv(self, ops: list[P2POp]) -> list[_Done | _Received]:
        return [op.op(op.tensor, op.peer, op.group) for op in ops]

    # ---- the meeting point -----------------------------------------------------------------

    def _members(self, group: ThreadGroup | None) -> tuple[int, ...]:
        return tuple(range(self.world)) if group is None else group.ranks

    def _barrier(self, group: ThreadGroup | None) -> None:
        members = self._members(group)
        with self._lock:
            barrier = self._barriers.setdefault(members, threading.Barrier(len(members)))
        barrier.wait(WAIT_S)

    def _exchange(self, group: ThreadGroup | None, tensor: Tensor) -> list[Tensor]:
        """Every member's `tensor`, in group-rank order (each member must call it)."""
        members = self._members(group)
        with self._lock:
            slots = self._slots.setdefault(members, [None] * len(members))
        slots[members.index(self._local.rank)] = tensor.clone()
        self._barrier(group)
        return list(slots)

    def _box(self, src: int, dst: int) -> queue.Queue:
        with self._lock:
            return self._boxes.setdefault((src, dst), queue.Queue())
