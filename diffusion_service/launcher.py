"""Starts and stops the worker ranks 1..N-1 from a small launcher process.

The launcher is forked at start-up, before rank 0 starts any thread (gRPC, engine) or touches
CUDA, so it can fork clean worker processes later too, e.g. to restart the group after a rank
died. Rank 0 talks to it over a pipe in plain text lines ("start PORT", "stop"); nothing is
pickled. If rank 0 dies, the pipe closes and the launcher kills the workers: no orphans.
The launcher ignores SIGTERM and SIGINT: a signal to the whole process group is rank 0's to
handle, which drains its work and then stops the workers through the launcher in order.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable

WorkerMain = Callable[[int, int, int], None]  # (rank, world, port)


class RankLauncher:
    """Rank 0's handle on the launcher process."""

    def __init__(self, world: int, worker_main: WorkerMain) -> None:
        self.world = world
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the launcher
            os.close(self._to_child)
            os.close(self._from_child)
            code = 0
            try:
                _launcher_loop(
                    os.fdopen(to_child_r, "r"), os.fdopen(from_child_w, "w"), world, worker_main
                )
            except BaseException:  # noqa: BLE001 - the launcher must never return into rank 0's code
                code = 1
            os._exit(code)
        os.close(to_child_r)
        os.close(from_child_w)
        self._writer = os.fdopen(self._to_child, "w")
        self._reader = os.fdopen(self._from_child, "r")
        self._exited = False

    @property
    def alive(self) -> bool:
        """Whether the launcher process still runs (reaps it once it has exited)."""
        if not self._exited:
            try:
                pid, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                pid = self.pid
            self._exited = pid != 0
        return not self._exited

    def _ask(self, line: str) -> str:
        self._writer.write(line + "\n")
        self._writer.flush()
        answer = self._reader.readline()
        if not answer:
            raise RuntimeError("the rank launcher process has exited")
        return answer.strip()

    def start(self, port: int) -> list[int]:
        """Fork ranks 1..N-1, which join the group at 127.0.0.1:`port`; returns their pids."""
        return [int(p) for p in self._ask(f"start {port}").split()[1:]]

    def stop(self) -> None:
        """Kill and reap every worker rank (the launcher does so itself if it is gone)."""
        if self._writer.closed:
            return
        with contextlib.suppress(OSError, RuntimeError):
            self._ask("stop")

    def close(self) -> None:
        """End the launcher (and with it every worker); safe to call more than once."""
        if self._writer.closed:
            return
        with contextlib.suppress(OSError, RuntimeError):
            self._ask("exit")
        for f in (self._writer, self._reader):
            with contextlib.suppress(OSError):
                f.close()
        if not self._exited:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            self._exited = True


def _kill_all(pids: list[int], grace_s: float = 2.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        for pid in list(alive):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                alive.remove(pid)
        time.sleep(0.02)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def _launcher_loop(commands, answers, world: int, worker_main: WorkerMain) -> None:
    # Ctrl-C or `kill` of the whole group is rank 0's to handle: it drains, then says "stop"
    # and "exit". Dying here would kill the workers under a job that rank 0 is still finishing.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pids: list[int] = []
    try:
        for line in commands:
            verb, *args = line.split()
            if verb == "start":
                _kill_all(pids)
                pids = [
                    _fork_worker(rank, world, int(args[0]), worker_main) for rank in range(1, world)
                ]
                answers.write("started " + " ".join(map(str, pids)) + "\n")
            elif verb == "stop":
                _kill_all(pids)
                pids = []
                answers.write("stopped\n")
            elif verb == "exit":
                answers.write("bye\n")
                answers.flush()
                break
            answers.flush()
    finally:  # rank 0 went away (pipe closed) or asked us to exit
        _kill_all(pids)


def _fork_worker(rank: int, world: int, port: int, worker_main: WorkerMain) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        os.setpgid(0, 0)  # Ctrl-C on the terminal reaches rank 0, which stops us in order
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the launcher's SIGTERM ends a worker
        worker_main(rank, world, port)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException as e:  # noqa: BLE001
        print(f"rank {rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        code = 1
    os._exit(code)
