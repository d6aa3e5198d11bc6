"""Rank 0's view of the rank group: start it, talk to it, restart it after a failure, stop it."""

from __future__ import annotations

import functools
import logging
import socket

import torch

from bagel.model import Bagel
from diffusion_service.job import Command, JobSpec, RankMessage, send_message
from diffusion_service.launcher import RankLauncher
from diffusion_service.ranks import join_group, leave_group, load_rank_model, worker_main
from diffusion_service.runner import RankRuntime
from diffusion_service.settings import ServiceSettings

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankWorld:
    """Owns the launcher of ranks 1..N-1 and rank 0's membership of the group.

    Construct it before any thread starts (it forks the launcher); call every other method from
    one thread, the engine's.
    """

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.launcher = (
            RankLauncher(settings.world_size, functools.partial(worker_main, settings))
            if settings.world_size > 1 and not settings.torchrun
            else None
        )
        self.model: Bagel | None = None
        self.marker_ids: tuple[int, int] = (0, 0)
        self.runtime: RankRuntime | None = None
        self.worker_pids: list[int] = []

    def start(self) -> RankRuntime:
        if self.model is None:
            self.model, self.marker_ids = load_rank_model(self.settings, 0)
        if self.settings.torchrun:
            init_method = "env://"
        else:
            port = free_port()
            init_method = f"tcp://127.0.0.1:{port}"
            if self.launcher is not None:
                self.worker_pids = self.launcher.start(port)
        self.runtime = join_group(self.settings, 0, init_method, self.model, self.marker_ids)
        log.info("rank group of %d is up (workers %s)", self.settings.world_size, self.worker_pids)
        return self.runtime

    def send(self, command: Command, job: JobSpec | None = None) -> None:
        """Broadcast a command (and the job it starts) to every rank."""
        send_message(RankMessage(command, job), self.runtime.control_group)

    @property
    def can_restart(self) -> bool:
        """torchrun owns its ranks: after a failure the whole group must exit for it to restart."""
        return not self.settings.torchrun

    @property
    def launcher_alive(self) -> bool:
        """False once the launcher has exited (killed on its own): no worker can start again."""
        return self.launcher is None or self.launcher.alive

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
        if self.launcher is not None:
            self.launcher.close()

    def _tear_down(self) -> None:
        runtime, self.runtime = self.runtime, None
        try:
            leave_group(runtime)
        except Exception as e:  # noqa: BLE001 - a broken group may fail to destroy cleanly
            log.warning("leaving the rank group failed: %s", e)
        if self.launcher is not None:
            self.launcher.stop()
        self.worker_pids = []

    @property
    def device(self) -> torch.device:
        return self.runtime.device
