"""How the ranks start, meet and stop: forked on this host by our own launcher (`OwnRanks`), or
started by torchrun on one host or several (`TorchrunRanks`). Rank 0 sees either through one
interface, `RankGroup`, that `rank_group(settings)` picks; nothing else asks which it is.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from datetime import timedelta
from typing import ClassVar, NoReturn

import torch
import torch.distributed as dist

from bagel.network.config import BagelConfig
from bagel.network.model import Bagel
from diffusion_service.job import Command, JobSpec, RankMessage, send_message
from diffusion_service.parallel.config import ParallelConfig
from diffusion_service.settings import ServiceSettings
from diffusion_service.worker import (
    Meeting,
    RankRuntime,
    join_group,
    leave_group,
    load_rank_model,
    serve_rank,
)
from serving.errors import InvalidParams

log = logging.getLogger(__name__)

WorkerMain = Callable[[int, int, int], None]  # (rank, world, port)
RESTART_EXIT_CODE = 1  # any non-zero status: torchrun counts a failure and restarts the group
EXIT_GRACE_S = 0.5  # time for the event loop to send NOT_SERVING and the failed calls' status


def rank_group(settings: ServiceSettings) -> RankGroup:
    """Rank 0's handle on the group, for the way its ranks are started. Call it before any
    thread starts (our own ranks fork their launcher here)."""
    return TorchrunRanks(settings) if settings.torchrun else OwnRanks(settings)


def validate_settings(settings: ServiceSettings) -> BagelConfig:
    """Fail at start-up, before any process starts, on a topology the model cannot run (or
    that does not fit the world torchrun started) and on a default step cache it cannot use."""
    config = BagelConfig.from_dir(settings.model_dir)
    llm = config.llm
    if settings.torchrun:
        world = TorchrunWorld.from_env()
        world.check(settings.parallel, llm.num_heads, llm.num_kv_heads)
        world.check_devices(settings.device)
    else:
        settings.parallel.validate(llm.num_heads, llm.num_kv_heads)
    try:
        settings.default_cache.check_fits(llm.num_layers)
    except InvalidParams as e:  # else every request that leaves its cache unset would be refused
        raise ValueError(f"--default-cache: {e}") from None
    return config


class RankGroup(abc.ABC):
    """Rank 0's view of the rank group: start it, talk to it, restart it after a failure, stop
    it. Call every method but the constructor from one thread, the engine's."""

    can_restart: ClassVar[bool]  # whether rank 0 may restart the group after a failure

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.model: Bagel | None = None
        self.marker_ids: tuple[int, int] = (0, 0)
        self.runtime: RankRuntime | None = None

    @abc.abstractmethod
    def _start_others(self) -> Meeting:
        """Have ranks 1..N-1 join (where ours, start them); returns where rank 0 meets them."""

    @abc.abstractmethod
    def _stop_others(self) -> None:
        """Stop ranks 1..N-1 where they are ours to stop."""

    @property
    @abc.abstractmethod
    def alive(self) -> bool:
        """False once no rank 1..N-1 can start again (our launcher has exited)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release what starting the ranks took; safe to call more than once."""

    def start(self) -> RankRuntime:
        if self.model is None:
            self.model, self.marker_ids = load_rank_model(self.settings, 0)
        meeting = self._start_others()
        self.runtime = join_group(self.settings, 0, meeting, self.model, self.marker_ids)
        log.info("rank group of %d is up", self.settings.world_size)
        return self.runtime

    def send(self, command: Command, job: JobSpec | None = None) -> None:
        """Broadcast a command (and the job it starts) to every rank."""
        send_message(RankMessage(command, job), self.runtime.control_group)

    def restart(self) -> RankRuntime:
        log.warning("restarting the rank group")
        self._tear_down()
        return self.start()

    def shutdown(self) -> None:
        if self.runtime is not None:
            try:
                self.send(Command.SHUTDOWN)
            except Exception as e:  # noqa: BLE001 - the group may already be broken
                log.warning("could not tell the ranks to shut down: %s", e)
        self._tear_down()
        self.close()

    def _tear_down(self) -> None:
        runtime, self.runtime = self.runtime, None
        try:
            leave_group(runtime)
        except Exception as e:  # noqa: BLE001 - a broken group may fail to destroy cleanly
            log.warning("leaving the rank group failed: %s", e)
        self._stop_others()


class OwnRanks(RankGroup):
    """Ranks 1..N-1 forked on this host by a launcher process of ours (none for a group of one).

    The launcher is forked here, at start-up, before rank 0 starts any thread (gRPC, engine) or
    touches CUDA, so it can fork clean worker processes later too, e.g. to restart the group
    after a rank died. Rank 0 talks to it over a pipe in plain text lines ("start PORT", "stop",
    "exit"); nothing is pickled. If rank 0 dies, the pipe closes and the launcher kills the
    workers: no orphans. The launcher ignores SIGTERM and SIGINT: a signal to the whole process
    group is rank 0's to handle, which drains its work and then stops the workers through the
    launcher in order. The ranks meet at a fresh `tcp://127.0.0.1:PORT` each time.
    """

    can_restart = True

    def __init__(self, settings: ServiceSettings) -> None:
        super().__init__(settings)
        self.launcher_pid: int | None = None
        self._exited = False
        if settings.world_size > 1:
            self._fork_launcher(functools.partial(worker_main, settings))

    def _fork_launcher(self, worker: WorkerMain) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        self.launcher_pid = os.fork()
        if self.launcher_pid == 0:  # the launcher
            os.close(to_child_w)
            os.close(from_child_r)
            code = 0
            try:
                world = self.settings.world_size
                _launcher_loop(os.fdopen(to_child_r), os.fdopen(from_child_w, "w"), world, worker)
            except BaseException:  # noqa: BLE001 - the launcher must never return into rank 0's code
                code = 1
            os._exit(code)
        os.close(to_child_r)
        os.close(from_child_w)
        self._writer = os.fdopen(to_child_w, "w")
        self._reader = os.fdopen(from_child_r)

    def _ask(self, line: str) -> str:
        self._writer.write(line + "\n")
        self._writer.flush()
        answer = self._reader.readline()
        if not answer:
            raise RuntimeError("the rank launcher process has exited")
        return answer.strip()

    def _start_others(self) -> Meeting:
        port = free_port()
        keep_gloo_on_loopback()
        if self.launcher_pid is not None:  # the workers join at 127.0.0.1:port
            log.info("worker ranks started, pids %s", self._ask(f"start {port}").split(" ", 1)[-1])
        return {"init_method": f"tcp://127.0.0.1:{port}"}

    def _stop_others(self) -> None:
        """Kill and reap every worker rank (the launcher does so itself if it is gone)."""
        if self.launcher_pid is not None and not self._writer.closed:
            with contextlib.suppress(OSError, RuntimeError):
                self._ask("stop")

    @property
    def alive(self) -> bool:
        """Whether the launcher process still runs (reaps it once it has exited)."""
        if self.launcher_pid is not None and not self._exited:
            try:
                pid, _ = os.waitpid(self.launcher_pid, os.WNOHANG)
            except ChildProcessError:
                pid = self.launcher_pid
            self._exited = pid != 0
        return not self._exited

    def close(self) -> None:
        """End the launcher (and with it every worker)."""
        if self.launcher_pid is None or self._writer.closed:
            return
        with contextlib.suppress(OSError, RuntimeError):
            self._ask("exit")
        for f in (self._writer, self._reader):
            with contextlib.suppress(OSError):
                f.close()
        if not self._exited:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.launcher_pid, 0)
            self._exited = True


def worker_main(settings: ServiceSettings, rank: int, world: int, port: int) -> None:
    """Ranks 1..N-1 forked by our launcher."""
    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    keep_gloo_on_loopback()
    serve_rank(settings, rank, lambda: {"init_method": f"tcp://127.0.0.1:{port}"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keep_gloo_on_loopback(env: MutableMapping[str, str] = os.environ) -> None:
    """Our own ranks all live on this host: their gloo traffic (the control group, and the whole
    group on CPUs) stays on the loopback unless the operator named an interface. Left alone, gloo
    takes the address the hostname resolves to, which can be a private or unreachable one."""
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")


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


class TorchrunRanks(RankGroup):
    """Ranks started by torchrun, on this host or others; they meet in torchrun's store, kept
    apart from earlier attempts' keys. torchrun owns the processes: a rank that fails makes every
    process of the group exit with a non-zero status (rank 0 on the failed collective, the others
    on the broken connection), so each node's agent counts one failure and, within
    `--max-restarts`, starts the group again; beyond it torchrun exits and the node's supervisor
    takes over."""

    can_restart = False  # torchrun owns its ranks: after a failure the whole group must exit

    def _start_others(self) -> Meeting:
        return {"store": group_store(TorchrunWorld.from_env(), self.settings.collective_timeout)}

    def _stop_others(self) -> None:
        """torchrun stops its ranks."""

    @property
    def alive(self) -> bool:
        return True

    def close(self) -> None:
        """Nothing was started here."""


def serve_torchrun_rank(settings: ServiceSettings, world: TorchrunWorld) -> None:
    """Every rank but global rank 0 under torchrun: validate, then follow rank 0's commands."""
    validate_settings(settings)
    serve_rank(
        settings, world.rank, lambda: {"store": group_store(world, settings.collective_timeout)}
    )


@dataclass(frozen=True)
class TorchrunWorld:
    """One process's place in the world torchrun started (its environment variables)."""

    rank: int  # RANK: global; 0 serves gRPC
    world_size: int  # WORLD_SIZE = nodes x processes per node
    local_rank: int  # LOCAL_RANK: this process's GPU on its node
    local_world_size: int  # LOCAL_WORLD_SIZE: --nproc-per-node
    node_rank: int  # GROUP_RANK: the node's index in this attempt
    num_nodes: int  # GROUP_WORLD_SIZE: --nnodes
    restart_count: int  # TORCHELASTIC_RESTART_COUNT: failures this node's agent has restarted
    max_restarts: int  # TORCHELASTIC_MAX_RESTARTS
    agent_store: bool  # TORCHELASTIC_USE_AGENT_STORE: the agent's store outlives the ranks

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> TorchrunWorld:
        def number(name: str, fallback: str | None = None) -> int:
            value = env.get(name, fallback)
            if value is None:
                raise ValueError(f"torchrun did not set {name}")
            return int(value)

        world_size = number("WORLD_SIZE")
        local_world_size = number("LOCAL_WORLD_SIZE", str(world_size))
        return cls(
            rank=number("RANK"),
            world_size=world_size,
            local_rank=number("LOCAL_RANK", env.get("RANK")),
            local_world_size=local_world_size,
            node_rank=number("GROUP_RANK", "0"),
            num_nodes=number("GROUP_WORLD_SIZE", str(max(1, world_size // local_world_size))),
            restart_count=number("TORCHELASTIC_RESTART_COUNT", "0"),
            max_restarts=number("TORCHELASTIC_MAX_RESTARTS", "0"),
            agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
        )

    def describe(self) -> str:
        return (
            f"rank {self.rank} of {self.world_size} (node {self.node_rank} of {self.num_nodes}, "
            f"local rank {self.local_rank} of {self.local_world_size}, restart "
            f"{self.restart_count} of at most {self.max_restarts})"
        )

    def check(self, parallel: ParallelConfig, num_heads: int, num_kv_heads: int) -> None:
        """Raise ValueError unless the topology flags fill exactly the world torchrun started."""
        try:
            parallel.validate(num_heads, num_kv_heads, self.world_size)
        except ValueError as e:
            raise ValueError(
                f"torchrun started {self.world_size} ranks ({self.num_nodes} nodes x "
                f"{self.local_world_size} per node), and --ulysses/--kv-gather x --ring x "
                f"--cfg-parallel must multiply to that: {e}"
            ) from None

    def check_devices(self, device: str) -> None:
        """On CUDA, each process of a node takes the GPU numbered by its local rank."""
        if device != "cuda":
            return
        gpus = torch.cuda.device_count()
        if self.local_rank >= gpus:
            raise ValueError(
                f"torchrun started {self.local_world_size} processes on this node "
                f"(--nproc-per-node) but it has {gpus} GPUs visible; local rank {self.local_rank} "
                "has none"
            )

    def warn_about_restarts(self) -> None:
        """Say when `--max-restarts` cannot work: torch >= 2.5 shares the c10d rendezvous store
        with the ranks and tells every node a different restart count (pytorch#135712)."""
        if self.rank == 0 and self.agent_store and self.num_nodes > 1 and self.max_restarts > 0:
            log.warning(
                "torchrun --max-restarts %d across %d nodes: with --rdzv-backend c10d, set "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment, or the "
                "restarted ranks may meet an earlier attempt's keys and fail to connect "
                "(pytorch#135712); the static rendezvous (--master-addr) needs nothing",
                self.max_restarts,
                self.num_nodes,
            )


def group_store(world: TorchrunWorld, timeout: timedelta) -> dist.Store:
    """The store the ranks meet in (`MASTER_ADDR:MASTER_PORT`, as `env://` finds it).

    When torchrun's agent hosts it (TORCHELASTIC_USE_AGENT_STORE), it outlives the ranks, and
    torch keeps no attempt's keys apart from the next's: a restarted rank would read the address
    a dead one published and fail to connect. Keys are kept per attempt here, numbered by the
    agent's restart count, which every node counts alike when every rank exits on a failure
    (all ranks of one node restart together; across nodes, see `warn_about_restarts`).
    """
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    if world.agent_store:
        store = dist.PrefixStore(f"bagel/attempt_{world.restart_count}", store)
    return store


def exit_for_restart(reason: str) -> NoReturn:
    """Called on rank 0 once the group has failed (health already NOT_SERVING, queued work
    already failed): wait `EXIT_GRACE_S` for those answers to leave, then exit without tearing
    down a broken process group, so that torchrun restarts every rank."""
    log.critical(
        "the rank group failed under torchrun (%s): exiting with status %d so that torchrun "
        "restarts the whole group (--max-restarts)",
        reason,
        RESTART_EXIT_CODE,
    )
    time.sleep(EXIT_GRACE_S)
    logging.shutdown()
    os._exit(RESTART_EXIT_CODE)
