"""What every rank runs: join the group, serve rank 0's commands, and denoise each job's part.

Ranks 1..N-1 run `serve_rank`: wait for rank 0's message (`diffusion_service.job`), receive the
broadcast KV cache, run the job (`run_job`), repeat until SHUTDOWN or until the group fails. Rank 0
joins the same way (`join_group`, from `diffusion_service.launch`) and calls `run_job` from its
engine, so every collective of a job is entered by every rank in the same order. Where the ranks
meet (a TCP address for our own ranks, torchrun's store) is the caller's to say.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from bagel.checkpoints.checkpoint import load_bagel
from bagel.devices import default_dtype
from bagel.diffusion.generation import ForwardGraphs
from bagel.diffusion.sampler import denoise, initial_noise, preview_steps, schedule
from bagel.network.attention import AttentionPrecision
from bagel.network.kv import Branch, ContextKV
from bagel.network.model import Bagel
from bagel.text.tokenizer import load_tokenizer
from diffusion_service.job import Command, JobSpec, receive_message
from diffusion_service.memory import PeakMemory, gather_peaks
from diffusion_service.parallel.mesh import ParallelMesh
from diffusion_service.settings import ServiceSettings
from diffusion_service.velocity import ShardedVelocity, shard_sum
from step_cache.collective import make_step_cache, world_sum
from transport.broadcast import broadcast_kv
from transport.layout import KVCache

log = logging.getLogger(__name__)

# `dist.init_process_group`'s keywords that say where the ranks meet: `init_method=` for our own
# ranks, `store=` under torchrun.
Meeting = Mapping[str, Any]
LEAVE_TIMEOUT_S = 30.0


class JobCancelled(Exception):
    """Rank 0 decided to stop the job (client cancel, deadline, shutdown); raised on every rank."""


@dataclass
class RankRuntime:
    """What one rank holds for its whole life: its place in the mesh and its model."""

    mesh: ParallelMesh
    model: Bagel
    marker_ids: tuple[int, int]
    device: torch.device
    control_group: dist.ProcessGroup | None  # gloo group for commands and per-step flags
    graphs: ForwardGraphs | None = None  # CUDA-graph captures kept across jobs (GPU only)
    # Every rank's peak GPU memory at the last gather (after joining, after each job); () on CPU.
    peak_memory: tuple[PeakMemory, ...] = field(default_factory=tuple)
    attention_precision: AttentionPrecision = (
        "bf16"  # the generation block's (--attention-precision)
    )

    @property
    def is_leader(self) -> bool:
        return self.mesh.rank == 0


# ---- joining and leaving ---------------------------------------------------------------------


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


def join_group(
    settings: ServiceSettings,
    rank: int,
    meeting: Meeting,
    model: Bagel,
    marker_ids: tuple[int, int],
) -> RankRuntime:
    """Join the group where `meeting` says and build the mesh; every rank calls this alike."""
    device = rank_device(settings, rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        **meeting,
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
    runtime = RankRuntime(
        mesh,
        model,
        marker_ids,
        device,
        control,
        graphs,
        attention_precision=settings.attention_precision,
    )
    runtime.peak_memory = gather_peaks(device, control)  # the weights' footprint, every rank
    return runtime


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


# ---- the loop of ranks 1..N-1 ----------------------------------------------------------------


def serve_rank(settings: ServiceSettings, rank: int, meeting: Callable[[], Meeting]) -> None:
    """Ranks 1..N-1: load the model, join the group (`meeting()` once the model is loaded), and
    serve rank 0's commands until SHUTDOWN or until the group fails."""
    model, markers = load_rank_model(settings, rank)
    runtime = join_group(settings, rank, meeting(), model, markers)
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


# ---- one job on one rank ---------------------------------------------------------------------


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


def step_flag(runtime: RankRuntime, keep_going: bool) -> bool:
    """Rank 0's continue/cancel decision, broadcast to every rank."""
    flag = torch.tensor([int(keep_going)], dtype=torch.int64)
    if runtime.control_group is not None:
        dist.broadcast(flag, src=0, group=runtime.control_group)
    return bool(flag.item())


def run_job(
    runtime: RankRuntime,
    job: JobSpec,
    contexts: Mapping[Branch, ContextKV],
    keep_going: Callable[[], bool] = lambda: True,
    on_progress: Callable[[int, int, bool], None] = lambda done, total, cached: None,
    on_preview: Callable[[int, int, Tensor], None] = lambda index, step, latents: None,
) -> Tensor | None:
    """Denoise `job` on this rank: shard the noise, denoise with this rank's velocity model,
    check rank 0's continue flag after every step, gather the clean-image estimate at the
    request's preview steps, and gather the latents (and every rank's peak GPU memory) once at
    the end.

    Returns the full fp32 latents `[h*w, patch_dim]` on rank 0 and None elsewhere; raises
    JobCancelled on every rank when rank 0 says stop. For each of the request's
    `partial_images`, rank 0's `on_preview` gets (preview index, step, the full fp32 clean-image
    estimate `[h*w, patch_dim]` on the CPU); every rank takes part in its gather."""
    config = runtime.model.config
    params = job.params
    grid = config.latent_grid(params.height, params.width)
    num_tokens = grid[0] * grid[1]
    sharding = runtime.mesh.latent_sharding(num_tokens)
    noise = initial_noise(params, num_tokens, config.patch_dim)
    x = sharding.shard(noise, dim=0).to(runtime.device)
    step_cache = make_step_cache(params.cache, sharding.num_valid, world_sum(runtime.device))
    velocity = ShardedVelocity(
        runtime.model,
        contexts,
        runtime.mesh,
        sharding,
        grid,
        runtime.marker_ids,
        graphs=runtime.graphs,
        step_cache=step_cache,
        attention_precision=runtime.attention_precision,
    )

    total_steps = len(schedule(params.num_timesteps, params.timestep_shift)[0])
    previews = preview_steps(total_steps, params.partial_images)

    def on_estimate(step: int, estimate: Tensor) -> None:
        full = sharding.gather(estimate, runtime.mesh.sp_group, dim=0)
        if runtime.is_leader:
            full = full.float().cpu()
            for index, preview_step in enumerate(previews):
                if preview_step == step:
                    on_preview(index, step, full)

    def on_step(done: int, total: int, cached: bool) -> None:
        go = step_flag(runtime, keep_going() if runtime.is_leader else True)
        on_progress(done, total, cached)  # every rank knows whether the step was cached
        if not go:
            raise JobCancelled(f"stopped after step {done} of {total}")

    x = denoise(
        x,
        velocity,
        params,
        has_img_context=Branch.UNCOND_IMG in contexts,
        reduce_sum=shard_sum(runtime.mesh),
        on_step=on_step,
        step_cache=step_cache,
        on_estimate=on_estimate,
        estimate_steps=frozenset(previews),
    )
    full = sharding.gather(x, runtime.mesh.sp_group, dim=0)
    runtime.peak_memory = gather_peaks(runtime.device, runtime.control_group)
    return full.float().cpu() if runtime.is_leader else None
