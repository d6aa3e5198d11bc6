"""The rank group when torchrun starts it (one host or several): the world torchrun started, read
from its environment and checked against the topology flags; the store the ranks meet in, kept
apart from earlier attempts' keys; and leaving the group so that torchrun restarts all of it.

torchrun owns the processes: global rank 0 serves gRPC, every other rank runs the worker loop,
and nobody here starts or restarts a rank. A rank that fails makes every process of the group
exit with a non-zero status (rank 0 on the failed collective, the others on the broken
connection), so each node's agent counts one failure and, within `--max-restarts`, starts the
group again; beyond it torchrun exits and the node's supervisor takes over.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

from diffusion_service.parallel.config import ParallelConfig

log = logging.getLogger(__name__)

RESTART_EXIT_CODE = 1  # any non-zero status: torchrun counts a failure and restarts the group
EXIT_GRACE_S = 0.5  # time for the event loop to send NOT_SERVING and the failed calls' status


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


def started_by_torchrun(env: Mapping[str, str] = os.environ) -> bool:
    return "TORCHELASTIC_RUN_ID" in env or (
        "RANK" in env and "WORLD_SIZE" in env and "MASTER_ADDR" in env
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
