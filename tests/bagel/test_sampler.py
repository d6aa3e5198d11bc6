"""The flow-matching schedule and the CFG combination."""

from __future__ import annotations

import pytest
import torch

from bagel.kv import Branch
from bagel.sampler import (
    StepPlan,
    combine_guidance,
    denoise,
    plan_step,
    schedule,
)
from serving.params import GenerationParams

COND, UNCOND_TEXT, UNCOND_IMG = Branch.COND, Branch.UNCOND_TEXT, Branch.UNCOND_IMG


def test_50_timesteps_give_49_steps_41_inside_the_cfg_window_at_shift_3():
    t, dt = schedule(50, 3.0)
    assert len(t) == len(dt) == 49
    assert t[0] == 1.0 and torch.all(dt > 0)
    assert torch.isclose(dt.sum(), torch.tensor(1.0))
    params = GenerationParams()
    with_cfg = [s for s in t if len(plan_step(s, params, False).branches) > 1]
    assert len(with_cfg) == 41


def test_shifted_schedule_formula():
    t, _ = schedule(5, 3.0)
    u = torch.tensor([1.0, 0.75, 0.5, 0.25])
    assert torch.allclose(t, 3 * u / (1 + 2 * u))


def test_text_to_image_plans_two_branches_and_editing_three():
    params = GenerationParams(cfg_text_scale=4.0, cfg_img_scale=1.5)
    t = torch.tensor(0.9)
    assert plan_step(t, params, has_img_context=False).branches == (COND, UNCOND_TEXT)
    assert plan_step(t, params, has_img_context=True).branches == (COND, UNCOND_TEXT, UNCOND_IMG)
    assert plan_step(torch.tensor(0.3), params, False) == StepPlan((COND,), 1.0, 1.0)
    no_text = GenerationParams(cfg_text_scale=1.0)
    assert plan_step(t, no_text, True).branches == (COND,)


def vs(seed=0, n=12):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 64, generator=g, dtype=torch.float64) for _ in range(3)]


def test_global_renorm_guidance_formula():
    v_c, v_u, v_i = vs()
    plan = StepPlan((COND, UNCOND_TEXT, UNCOND_IMG), 4.0, 1.5)
    out = combine_guidance(v_c, v_u, v_i, plan, "global", 0.0)
    raw = v_i + 1.5 * ((v_u + 4.0 * (v_c - v_u)) - v_i)
    expected = raw * (v_c.norm() / (raw.norm() + 1e-8)).clamp(0.0, 1.0)
    assert torch.allclose(out, expected, rtol=1e-12, atol=0)


def test_text_to_image_guidance_is_an_effective_scale_of_5_5():
    v_c, v_u, _ = vs(1)
    plan = StepPlan((COND, UNCOND_TEXT), 4.0, 1.5)
    out = combine_guidance(v_c, v_u, v_c, plan, "global", 1.0)  # renorm off
    assert torch.allclose(out, v_u + 5.5 * (v_c - v_u), rtol=1e-12, atol=1e-12)


def test_channel_and_text_channel_renorm_are_per_token():
    v_c, v_u, v_i = vs(2)
    plan = StepPlan((COND, UNCOND_TEXT, UNCOND_IMG), 3.0, 2.0)
    out = combine_guidance(v_c, v_u, v_i, plan, "channel", 0.0)
    raw = v_i + 2.0 * ((v_u + 3.0 * (v_c - v_u)) - v_i)
    scale = (v_c.norm(dim=-1, keepdim=True) / (raw.norm(dim=-1, keepdim=True) + 1e-8)).clamp(0, 1)
    assert torch.allclose(out, raw * scale, rtol=1e-12)
    out = combine_guidance(v_c, v_u, v_i, plan, "text_channel", 0.0)
    text = v_u + 3.0 * (v_c - v_u)
    text = text * (v_c.norm(dim=-1, keepdim=True) / (text.norm(dim=-1, keepdim=True) + 1e-8)).clamp(
        0, 1
    )
    assert torch.allclose(out, v_i + 2.0 * (text - v_i), rtol=1e-12)


def test_global_renorm_over_shards_equals_the_whole_through_reduce_sum():
    v_c, v_u, _ = vs(3, n=10)
    plan = StepPlan((COND, UNCOND_TEXT), 4.0, 1.0)
    whole = combine_guidance(v_c, v_u, v_c, plan, "global", 0.0)
    guided = v_u + 4.0 * (v_c - v_u)
    shards = [slice(0, 4), slice(4, 10)]
    parts = []
    for rows in shards:
        others = [s for s in shards if s != rows]
        # combine_guidance reduces |v_c|^2 first, then |guided|^2: add the other shards' parts
        other_sums = iter(
            [sum(v_c[o].pow(2).sum() for o in others), sum(guided[o].pow(2).sum() for o in others)]
        )
        parts.append(
            combine_guidance(
                v_c[rows],
                v_u[rows],
                v_c[rows],
                plan,
                "global",
                0.0,
                lambda x, s=other_sums: x + next(s),
            )
        )
    assert torch.allclose(torch.cat(parts), whole, rtol=1e-12)


def test_denoise_calls_back_every_step_and_can_be_stopped():
    params = GenerationParams(num_timesteps=6, cfg_text_scale=1.0)
    seen = []

    def velocity(x, t, branches):
        return {b: torch.ones_like(x) for b in branches}

    def on_step(done, total, cached):
        assert cached is False
        seen.append((done, total))
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        denoise(torch.zeros(2, 64), velocity, params, on_step=on_step)
    assert seen == [(1, 5), (2, 5), (3, 5)]
    x = denoise(torch.zeros(2, 64), velocity, params)
    assert torch.allclose(x, -torch.ones(2, 64))  # integrates v=1 over t from 1 to 0
