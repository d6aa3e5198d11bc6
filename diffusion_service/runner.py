"""One job on one rank: shard the noise, denoise with this rank's velocity model, check rank 0's
continue flag after every step, gather the clean-image estimate at the request's preview steps,
and gather the latents (and every rank's peak GPU memory) once at the end."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from bagel.generation import ForwardGraphs
from bagel.kv import Branch, ContextKV
from bagel.model import Bagel
from bagel.sampler import denoise, initial_noise, preview_steps, schedule
from diffusion_service.job import JobSpec
from diffusion_service.memory import PeakMemory, gather_peaks
from diffusion_service.parallel.mesh import ParallelMesh
from diffusion_service.step_cache import make_step_cache, world_sum
from diffusion_service.velocity import ShardedVelocity, shard_sum


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

    @property
    def is_leader(self) -> bool:
        return self.mesh.rank == 0


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
    """Denoise `job` on this rank. Returns the full fp32 latents `[h*w, patch_dim]` on rank 0
    and None elsewhere; raises JobCancelled on every rank when rank 0 says stop. For each of the
    request's `partial_images`, rank 0's `on_preview` gets (preview index, step, the full fp32
    clean-image estimate `[h*w, patch_dim]` on the CPU); every rank takes part in its gather."""
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
