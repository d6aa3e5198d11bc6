"""Joining the rank group, and the loop that ranks 1..N-1 run: wait for rank 0's command, receive
the broadcast KV cache, denoise their part, repeat."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, MutableMapping

import torch
import torch.distributed as dist

from bagel.checkpoint import load_bagel
from bagel.config import BagelConfig
from bagel.devices import default_dtype
from bagel.generation import ForwardGraphs
from bagel.kv import Branch, ContextKV
from bagel.model import Bagel
from bagel.tokenizer import load_tokenizer
from diffusion_service.job import Command, receive_message
from diffusion_service.memory import gather_peaks
from diffusion_service.parallel.mesh import ParallelMesh
from diffusion_service.runner import JobCancelled, RankRuntime, run_job
from diffusion_service.settings import ServiceSettings
from diffusion_service.torchrun import TorchrunWorld, group_store
from transport.broadcast import broadcast_kv
from transport.layout import KVCache

log = logging.getLogger("diffusion_service.ranks")


def rank_device(settings: ServiceSettings, rank: int) -> torch.device:
    if settings.device != "cuda":
        return torch.device("cpu")
    # Under torchrun a rank's GPU is its rank on this node; our own ranks are all on one node.
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))


def load_rank_model(settings: ServiceSettings, rank: int) -> tuple[Bagel, tuple[int, int]]:
    device = rank_device(settings, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tokenizer = load_tokenizer(settings.model_dir)
    markers = (tokenizer.start_of_image, tokenizer.end_of_image)
    model = load_bagel(
        settings.model_dir,
        "diffusion",
        default_dtype(device),
        device,
        linear_precision=settings.linear_precision,
        token_rows=markers,  # the ranks embed only the two image markers
    )
    return model, markers


def keep_gloo_on_loopback(env: MutableMapping[str, str] = os.environ) -> None:
    """Our own ranks all live on this host: their gloo traffic (the control group, and the whole
    group on CPUs) stays on the loopback unless the operator named an interface. Left alone, gloo
    takes the address the hostname resolves to, which can be a private or unreachable one."""
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")


def join_group(
    settings: ServiceSettings,
    rank: int,
    init_method: str,
    model: Bagel,
    marker_ids: tuple[int, int],
) -> RankRuntime:
    """Join the group (`tcp://127.0.0.1:PORT` for our own ranks, `env://` under torchrun) and
    build the mesh; every rank calls this alike."""
    device = rank_device(settings, rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if settings.torchrun:  # env://'s store, with each restart's keys kept apart
        meet = {"store": group_store(TorchrunWorld.from_env(), settings.collective_timeout)}
    else:
        meet = {"init_method": init_method}
        keep_gloo_on_loopback()
    dist.init_process_group(
        backend,
        **meet,
        rank=rank,
        world_size=settings.world_size,
        timeout=settings.collective_timeout,
    )
    # Commands and per-step flags are tiny CPU tensors: a gloo group for them on any backend.
    control = dist.new_group(backend="gloo", timeout=settings.collective_timeout)
    llm = model.config.llm
    mesh = ParallelMesh.build(
        settings.parallel,
        num_heads=llm.num_heads,
        num_kv_heads=llm.num_kv_heads,
        timeout=settings.collective_timeout,
    )
    graphs = ForwardGraphs() if device.type == "cuda" else None
    runtime = RankRuntime(mesh, model, marker_ids, device, control, graphs)
    runtime.peak_memory = gather_peaks(device, control)  # the weights' footprint, every rank
    return runtime


LEAVE_TIMEOUT_S = 30.0


def leave_group(runtime: RankRuntime | None = None, timeout: float = LEAVE_TIMEOUT_S) -> None:
    """Drop the rank's CUDA-graph captures, whose NCCL work pins the communicators, then destroy
    the process group. A destroy still running after `timeout` seconds is left behind (logged)
    so that shutting down or restarting the group never hangs on it."""
    if runtime is not None and runtime.graphs is not None:
        runtime.graphs.clear()
    if not dist.is_initialized():
        return
    errors: list[BaseException] = []

    def destroy() -> None:
        try:
            dist.destroy_process_group()
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            errors.append(e)

    worker = threading.Thread(target=destroy, name="leave-group", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        log.warning("destroying the process group did not finish in %.0f s; left behind", timeout)
    elif errors:
        raise errors[0]


def model_contexts(
    cache: KVCache, model: Bagel, device: torch.device
) -> Mapping[Branch, ContextKV]:
    """The received cache as the model's contexts, in its dtype on its device (views when they
    already match)."""
    dtype = model.vae2llm.weight.dtype

    def convert(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t.to(device=device, dtype=dtype) for t in tensors]

    return {
        Branch(c.kind): ContextKV(convert(c.keys), convert(c.values), c.next_rope_position)
        for c in cache.contexts
    }


def validate_settings(settings: ServiceSettings) -> BagelConfig:
    """Fail at start-up, before any process starts, on a topology the model cannot run (or
    that does not fit the world torchrun started)."""
    config = BagelConfig.from_dir(settings.model_dir)
    llm = config.llm
    if settings.torchrun:
        world = TorchrunWorld.from_env()
        world.check(settings.parallel, llm.num_heads, llm.num_kv_heads)
        world.check_devices(settings.device)
    else:
        settings.parallel.validate(llm.num_heads, llm.num_kv_heads)
    return config


def worker_main(settings: ServiceSettings, rank: int, world: int, port: int) -> None:
    """Ranks 1..N-1 started by our launcher."""
    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    serve_rank(settings, rank, f"tcp://127.0.0.1:{port}")


def serve_rank(settings: ServiceSettings, rank: int, init_method: str) -> None:
    """Ranks 1..N-1: serve rank 0's commands until SHUTDOWN or until the group fails."""
    model, markers = load_rank_model(settings, rank)
    runtime = join_group(settings, rank, init_method, model, markers)
    try:
        while True:
            message = receive_message(runtime.control_group)
            if message.command is Command.SHUTDOWN:
                return
            if message.job is None:  # a heartbeat
                continue
            job = message.job
            cache = broadcast_kv(
                None,
                group=dist.group.WORLD,
                device=runtime.device,
                timeout=settings.collective_timeout,
            )
            try:
                run_job(runtime, job, model_contexts(cache, model, runtime.device))
            except JobCancelled:
                log.info("rank %d: job %d cancelled", rank, job.job_id)
            finally:
                cache.release()
    finally:
        leave_group(runtime)
