"""BAGEL's flow-matching sampler: the shifted schedule, Euler steps, and CFG with renorm.

The velocity model is a callable, so the same loop runs in one process and on every rank of a
sequence-parallel group. Under sequence parallelism the latents are a shard; the only global
quantity, the "global" renorm's norm, goes through the injected `reduce_sum`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bagel.diffusion.params import SamplingParams
from bagel.diffusion.step_cache import NoStepCache, StepCache
from bagel.network.kv import Branch

# (x_t, t, branches) -> velocity per requested branch, fp32, shaped like x_t.
VelocityModel = Callable[[Tensor, Tensor, Sequence[Branch]], dict[Branch, Tensor]]
# Sums a tensor over every shard of the latent sequence (identity in one process).
ReduceSum = Callable[[Tensor], Tensor]


def schedule(num_timesteps: int, shift: float) -> tuple[Tensor, Tensor]:
    """(t at each Euler step, dt of each step): `num_timesteps` points give `num_timesteps - 1`
    steps; `t = s*u / (1 + (s-1)*u)` with u from 1 down to 0."""
    u = torch.linspace(1, 0, num_timesteps)
    t = shift * u / (1 + (shift - 1) * u)
    return t[:-1], t[:-1] - t[1:]


def in_cfg_window(t: Tensor, interval: tuple[float, float]) -> bool:
    return bool(interval[0] < t <= interval[1])


@dataclass(frozen=True)
class StepPlan:
    """What one step computes: the branches to run and the guidance scales to apply."""

    branches: tuple[Branch, ...]
    text_scale: float
    img_scale: float


def plan_step(t: Tensor, params: SamplingParams, has_img_context: bool) -> StepPlan:
    """Outside the CFG window both scales are 1 and only the conditional branch runs. The image
    branch is computed only when its context differs from the conditional one (it does not for
    text-to-image); otherwise the conditional velocity is reused, which is bit-identical."""
    if not in_cfg_window(t, params.cfg_interval):
        return StepPlan((Branch.COND,), 1.0, 1.0)
    text, img = params.cfg_text_scale, params.cfg_img_scale
    if text <= 1.0:  # BAGEL applies no guidance at all unless the text scale is above 1
        return StepPlan((Branch.COND,), text, img)
    branches = (Branch.COND, Branch.UNCOND_TEXT)
    if img > 1.0 and has_img_context:
        branches += (Branch.UNCOND_IMG,)
    return StepPlan(branches, text, img)


def _norm(x: Tensor, per_token: bool, reduce_sum: ReduceSum) -> Tensor:
    if per_token:
        return torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return reduce_sum(x.pow(2).sum()).sqrt()


def combine_guidance(
    v_cond: Tensor,
    v_text: Tensor,
    v_img: Tensor,
    plan: StepPlan,
    renorm_type: str,
    renorm_min: float,
    reduce_sum: ReduceSum = lambda x: x,
) -> Tensor:
    """BAGEL's CFG: `v = v_u + s_t (v_c - v_u)`, then with `s_i > 1` `v = v_i + s_i (v - v_i)`,
    rescaled by `clamp(|v_c| / |v|, renorm_min, 1)` (text_channel: renorm before image guidance)."""
    if plan.text_scale <= 1.0:
        return v_cond
    guided = v_text + plan.text_scale * (v_cond - v_text)
    if renorm_type == "text_channel":
        scale = (_norm(v_cond, True, reduce_sum) / (_norm(guided, True, reduce_sum) + 1e-8)).clamp(
            min=renorm_min, max=1.0
        )
        guided = guided * scale
        if plan.img_scale > 1.0:
            guided = v_img + plan.img_scale * (guided - v_img)
        return guided
    if plan.img_scale > 1.0:
        guided = v_img + plan.img_scale * (guided - v_img)
    per_token = renorm_type == "channel"
    scale = (
        _norm(v_cond, per_token, reduce_sum) / (_norm(guided, per_token, reduce_sum) + 1e-8)
    ).clamp(min=renorm_min, max=1.0)
    return guided * scale


def initial_noise(params: SamplingParams, num_tokens: int, patch_dim: int) -> Tensor:
    """`randn(h*w, patch_dim)` in fp32 on the CPU from the request seed: the same on every device."""
    generator = torch.Generator().manual_seed(params.seed)
    return torch.randn(num_tokens, patch_dim, generator=generator, dtype=torch.float32)


# (steps done, total steps, whether the step was served by the step cache); may raise to cancel.
StepCallback = Callable[[int, int, bool], None]
# (steps done, the clean-image estimate `x_t - t v` of that step, shaped like x).
EstimateCallback = Callable[[int, Tensor], None]


def preview_steps(total_steps: int, count: int) -> list[int]:
    """The 1-based steps after which `count` previews are taken, evenly spaced and before the last
    step (which gives the image itself): 49 steps, 3 previews -> [12, 24, 36]. With fewer steps
    than previews a step repeats, so there are always exactly `count`."""
    return [max(1, round(total_steps * (i + 1) / (count + 1))) for i in range(count)]


def denoise(
    x: Tensor,
    velocity: VelocityModel,
    params: SamplingParams,
    has_img_context: bool = False,
    reduce_sum: ReduceSum = lambda x: x,
    on_step: StepCallback | None = None,
    step_cache: StepCache | None = None,
    on_estimate: EstimateCallback | None = None,
    estimate_steps: frozenset[int] = frozenset(),
) -> Tensor:
    """Euler integration from noise (t=1) to data (t=0): `x <- x - v * dt`. `x` is fp32 and may
    be a shard of the latent tokens; the velocity model must return zeros on padding rows so that
    they add nothing to the global renorm. `step_cache` is the policy the velocity model asks; the
    loop tells it when each step begins and reports whether the step was served from it. After
    each step in `estimate_steps` (1-based), `on_estimate` gets that step's clean-image estimate
    `x0 = x_t - t v` (exact for the flow `x_t = (1 - t) x0 + t noise`, `v = noise - x0`); it is
    called before `on_step`."""
    cache = step_cache if step_cache is not None else NoStepCache()
    timesteps, dts = schedule(params.num_timesteps, params.timestep_shift)
    total = len(timesteps)
    for step, (t, dt) in enumerate(zip(timesteps, dts, strict=True)):
        plan = plan_step(t, params, has_img_context)
        cache.begin_step(step, total, plan.branches)
        v = velocity(x, t, plan.branches)
        v_cond = v[Branch.COND]
        v_img = v.get(Branch.UNCOND_IMG, v_cond)
        v_text = v.get(Branch.UNCOND_TEXT, v_cond)
        combined = combine_guidance(
            v_cond, v_text, v_img, plan, params.cfg_renorm_type, params.cfg_renorm_min, reduce_sum
        )
        if on_estimate is not None and step + 1 in estimate_steps:
            on_estimate(step + 1, x - combined.to(x.dtype) * t)
        x = x - combined.to(x.dtype) * dt
        if on_step is not None:
            on_step(step + 1, total, cache.step_was_cached)
    return x
