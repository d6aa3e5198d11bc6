"""The flow-matching schedule and the CFG combination."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from bagel.diffusion.sampler import (
    StepPlan,
    combine_guidance,
    denoise,
    in_cfg_window,
    initial_noise,
    plan_step,
    schedule,
)
from bagel.network.kv import Branch
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


# ---- boundaries, and the whole loop against the written formula -------------------------------


@pytest.mark.parametrize(
    ("t", "active"),
    [
        (0.4, False),  # the lower end is open: lo < t
        (math.nextafter(0.4, 1.0), True),
        (0.7, True),
        (1.0, True),  # the upper end is closed: t <= hi
    ],
)
def test_cfg_window_is_open_at_its_lower_end_and_closed_at_its_upper_end(t, active):
    t = torch.tensor(t, dtype=torch.float64)
    assert in_cfg_window(t, (0.4, 1.0)) is active
    branches = plan_step(t, GenerationParams(), has_img_context=True).branches
    assert branches == ((COND, UNCOND_TEXT, UNCOND_IMG) if active else (COND,))


def test_cfg_window_just_above_its_upper_end_is_inactive():
    assert not in_cfg_window(
        torch.tensor(math.nextafter(0.8, 1.0), dtype=torch.float64), (0.2, 0.8)
    )
    assert in_cfg_window(torch.tensor(0.8, dtype=torch.float64), (0.2, 0.8))


@pytest.mark.parametrize(("text", "img"), [(1.0, 2.0), (4.0, 1.0), (4.0, 1.5)])
def test_scales_at_exactly_one_mean_no_guidance_of_that_kind(text, img):
    params = GenerationParams(cfg_text_scale=text, cfg_img_scale=img)
    branches = plan_step(torch.tensor(0.9), params, has_img_context=True).branches
    assert (UNCOND_TEXT in branches) is (text > 1.0)
    assert (UNCOND_IMG in branches) is (text > 1.0 and img > 1.0)


def test_the_step_count_is_one_less_than_the_timesteps_at_every_size():
    for n in (2, 3, 50):
        totals = []
        denoise(
            torch.zeros(1, 4),
            lambda x, t, branches: {b: torch.ones_like(x) for b in branches},
            GenerationParams(num_timesteps=n, cfg_text_scale=1.0),
            on_step=lambda done, total, cached, seen=totals: seen.append((done, total)),
        )
        assert totals == [(i, n - 1) for i in range(1, n)]


class BranchVelocities:
    """A velocity model whose three branches differ: `v_b = a_b * x + t * c_b`."""

    def __init__(self, shape: tuple[int, int]) -> None:
        g = torch.Generator().manual_seed(5)
        self.a = {b: 0.1 * (i + 1) for i, b in enumerate(Branch)}
        self.c = {b: torch.randn(shape, generator=g, dtype=torch.float64) for b in Branch}
        self.calls: list[tuple[Branch, ...]] = []

    def of(self, branch: Branch, x: torch.Tensor, t: float) -> torch.Tensor:
        return self.a[branch] * x + t * self.c[branch]

    def __call__(self, x, t, branches):
        self.calls.append(tuple(branches))
        return {b: self.of(b, x, float(t)) for b in branches}


def written_cfg_loop(x, model, params, has_img_context):
    """DESIGN.md section 8's CFG, written out: `v = v_u + s_t (v_c - v_u)`; if `s_i > 1`
    `v = v_i + s_i (v - v_i)`; renorm `clamp(|v_c| / |v|, min, 1)` (text_channel: per token,
    before the image guidance; channel: per token; global: whole tensor); inside lo < t <= hi."""
    n, s = params.num_timesteps, params.timestep_shift
    ts = [s * (1 - i / (n - 1)) / (1 + (s - 1) * (1 - i / (n - 1))) for i in range(n)]
    lo, hi = params.cfg_interval
    st, si = params.cfg_text_scale, params.cfg_img_scale
    for t, t_next in zip(ts[:-1], ts[1:], strict=True):
        v_c = model.of(COND, x, t)
        if lo < t <= hi and st > 1.0:
            v_u = model.of(UNCOND_TEXT, x, t)
            v_i = model.of(UNCOND_IMG, x, t) if has_img_context and si > 1.0 else v_c
            v = v_u + st * (v_c - v_u)

            def renorm(v, per_token, v_c=v_c):
                if per_token:
                    ratio = v_c.norm(dim=-1, keepdim=True) / (v.norm(dim=-1, keepdim=True) + 1e-8)
                else:
                    ratio = v_c.norm() / (v.norm() + 1e-8)
                return v * ratio.clamp(params.cfg_renorm_min, 1.0)

            if params.cfg_renorm_type == "text_channel":
                v = renorm(v, True)
                if si > 1.0:
                    v = v_i + si * (v - v_i)
            else:
                if si > 1.0:
                    v = v_i + si * (v - v_i)
                v = renorm(v, params.cfg_renorm_type == "channel")
        else:
            v = v_c
        x = x - v * (t - t_next)
    return x


@pytest.mark.parametrize("renorm", ["global", "channel", "text_channel"])
@pytest.mark.parametrize("has_img_context", [True, False], ids=["editing", "text_to_image"])
def test_denoise_with_distinct_branch_velocities_follows_the_written_cfg_formula(
    renorm, has_img_context
):
    params = GenerationParams(
        num_timesteps=9,
        timestep_shift=2.0,
        cfg_text_scale=3.0,
        cfg_img_scale=2.0,
        cfg_interval=(0.3, 0.9),
        cfg_renorm_type=renorm,
        cfg_renorm_min=0.5,
    )
    x0 = torch.randn(6, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = BranchVelocities(tuple(x0.shape))
    got = denoise(x0, model, params, has_img_context=has_img_context)
    expected = written_cfg_loop(x0, BranchVelocities(tuple(x0.shape)), params, has_img_context)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    # the image branch runs where (and only where) the image context differs from cond
    assert any(UNCOND_IMG in call for call in model.calls) is has_img_context
    without_img = written_cfg_loop(x0, BranchVelocities(tuple(x0.shape)), params, False)
    assert (not has_img_context) or (without_img - got).abs().max() > 1e-3  # the test can tell


# ---- guidance at the edges of its scales and its clamp -----------------------------------------


def plan(text: float, img: float) -> StepPlan:
    return StepPlan((COND, UNCOND_TEXT, UNCOND_IMG), text, img)


def test_a_text_scale_just_above_one_runs_the_text_branch_and_guides():
    params = GenerationParams(cfg_text_scale=1.5, cfg_img_scale=0.5)
    step = plan_step(torch.tensor(0.9), params, has_img_context=True)
    assert step == StepPlan((COND, UNCOND_TEXT), 1.5, 0.5)
    v_c, v_u = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    guided = combine_guidance(v_c, v_u, v_c, plan(1.5, 1.0), "global", 0.0)
    assert not torch.equal(guided, v_c)


def test_without_text_guidance_the_plan_keeps_both_requested_scales():
    params = GenerationParams(cfg_text_scale=1.0, cfg_img_scale=2.0)
    assert plan_step(torch.tensor(0.9), params, True) == StepPlan((COND,), 1.0, 2.0)


@pytest.mark.parametrize("renorm", ["global", "channel", "text_channel"])
def test_a_text_scale_of_exactly_one_returns_the_cond_velocity_even_with_image_scale(renorm):
    v_c, v_u, v_i = (torch.tensor([[1.0, 2.0]]), torch.tensor([[5.0, -1.0]]), torch.zeros(1, 2))
    assert combine_guidance(v_c, v_u, v_i, plan(1.0, 3.0), renorm, 0.0) is v_c


@pytest.mark.parametrize("renorm", ["global", "channel", "text_channel"])
def test_the_renorm_never_scales_a_velocity_up(renorm):
    """Guidance that shrinks the velocity (|v| = |v_c| / 2) keeps it: the ratio clamps at 1."""
    v_c = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    v_u = 1.5 * v_c  # v = 2 v_c - 1.5 v_c = v_c / 2
    guided = combine_guidance(v_c, v_u, v_c, plan(2.0, 1.0), renorm, 0.0)
    assert torch.equal(guided, v_c / 2)


@pytest.mark.parametrize("renorm", ["global", "channel", "text_channel"])
def test_a_velocity_far_below_the_epsilon_is_kept_not_flipped_to_the_floor(renorm):
    """|v| + 1e-8 in the renorm's denominator: a tiny guided velocity gets ratio 1, not the floor."""
    v_c = torch.tensor([[1.0, 1e-9]])
    v_u = torch.tensor([[2.0, 2e-9]])  # v = 2 v_c - v_u = [0, 0]: renorm sees |v| = 0
    v_u[0, 1] = 3e-9  # v = [0, -1e-9]
    guided = combine_guidance(v_c, v_u, v_c, plan(2.0, 1.0), renorm, 0.5)
    expected = v_u + 2.0 * (v_c - v_u)
    assert torch.equal(guided, expected) and guided[0, 1] != 0


@pytest.mark.parametrize("renorm", ["global", "text_channel"])
def test_an_image_scale_of_exactly_one_adds_no_image_guidance(renorm):
    """With s_i = 1 the image step is skipped, not computed as v_i + 1 * (v - v_i), which a far
    away v_i would round."""
    v_c, v_u = torch.tensor([[1e-3, 0.0]]), torch.tensor([[0.0, 1e-3]])
    v_i = torch.tensor([[1e8, 1e8]])
    expected = combine_guidance(v_c, v_u, v_c, plan(2.0, 1.0), renorm, 0.0)
    assert torch.equal(combine_guidance(v_c, v_u, v_i, plan(2.0, 1.0), renorm, 0.0), expected)


class RecordingStepCache:
    """A step cache that records the steps begun and reports every odd step as cached."""

    def __init__(self) -> None:
        self.begun: list[tuple[int, int]] = []
        self.branches: list[tuple[Branch, ...]] = []
        self.step_was_cached = False

    def begin_step(self, step: int, total: int, branches) -> None:
        self.begun.append((step, total))
        self.branches.append(tuple(branches))
        self.step_was_cached = step % 2 == 1


def test_denoise_begins_each_step_on_the_given_cache_and_reports_what_it_served():
    cache, seen = RecordingStepCache(), []
    denoise(
        torch.zeros(1, 4),
        lambda x, t, branches: {b: torch.ones_like(x) for b in branches},
        GenerationParams(num_timesteps=5, cfg_text_scale=1.0),
        on_step=lambda done, total, cached: seen.append(cached),
        step_cache=cache,
    )
    assert cache.begun == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert seen == [False, True, False, True]
    # cfg_text_scale 1.0 turns CFG off: each step tells the cache it runs the cond branch only.
    assert cache.branches == [(Branch.COND,)] * 4


def test_denoise_runs_no_image_branch_unless_told_the_context_differs():
    model = BranchVelocities((2, 4))
    denoise(torch.zeros(2, 4, dtype=torch.float64), model, GenerationParams(num_timesteps=4))
    assert model.calls and all(UNCOND_IMG not in call for call in model.calls)


def test_denoise_passes_the_renorm_type_and_floor_to_the_guidance():
    """Same velocities, three renorm settings, three different results."""
    x0 = torch.randn(4, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    runs = []
    for renorm, floor in (("global", 0.0), ("global", 0.9), ("channel", 0.0)):
        params = GenerationParams(
            num_timesteps=5, cfg_interval=(0.0, 1.0), cfg_renorm_type=renorm, cfg_renorm_min=floor
        )
        runs.append(denoise(x0, BranchVelocities((4, 8)), params))
    assert not torch.allclose(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])


def test_initial_noise_is_fp32_randn_of_the_request_seed_shaped_tokens_by_patch_dim():
    noise = initial_noise(GenerationParams(seed=7), 6, 64)
    assert noise.shape == (6, 64) and noise.dtype == torch.float32
    expected = torch.randn(6, 64, generator=torch.Generator().manual_seed(7))
    assert torch.equal(noise, expected)
    assert torch.equal(initial_noise(GenerationParams(seed=7), 6, 64), noise)
    assert not torch.equal(initial_noise(GenerationParams(seed=8), 6, 64), noise)


def test_initial_noise_is_fp32_whatever_the_default_dtype():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        noise = initial_noise(GenerationParams(seed=7), 6, 64)
    finally:
        torch.set_default_dtype(before)
    assert noise.dtype == torch.float32
    assert torch.equal(noise, initial_noise(GenerationParams(seed=7), 6, 64))


def test_a_velocity_of_lower_precision_is_applied_in_the_latents_precision():
    """bf16 velocities step fp32 latents in fp32: `x - v.float() * dt`, not `x - (v * dt)` rounded
    to bf16 first; the same for the clean-image estimate."""
    params = GenerationParams(num_timesteps=3, cfg_text_scale=1.0)
    x0 = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    v = torch.randn(4, 8, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    estimates = {}
    got = denoise(
        x0,
        lambda x, t, branches: {b: v for b in branches},
        params,
        on_estimate=lambda step, x0_hat: estimates.setdefault(step, x0_hat),
        estimate_steps=frozenset({2}),  # not 1: t = 1 there, and v * 1 is exact in bf16
    )
    t, dt = schedule(params.num_timesteps, params.timestep_shift)
    after_one = x0 - v.float() * dt[0]
    want = after_one - v.float() * dt[1]
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert torch.equal(estimates[2], after_one - v.float() * t[1])
    assert not torch.equal(estimates[2], after_one - (v * t[1]).float())  # the test can tell


class RowVelocities:
    """`v_b = a_b * x + t * c_b[rows]` for the rows of one shard of the latent tokens."""

    def __init__(self, rows: slice, shape: tuple[int, int]) -> None:
        self.whole = BranchVelocities(shape)
        self.rows = rows

    def __call__(self, x, t, branches):
        w = self.whole
        return {b: w.a[b] * x + float(t) * w.c[b][self.rows] for b in branches}


class TwoShardSum:
    """`reduce_sum` for two shards run as threads: each adds the other's partial sum."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2, timeout=20)
        self.parts: list = [None, None]

    def of(self, shard: int):
        def reduce_sum(x: torch.Tensor) -> torch.Tensor:
            self.parts[shard] = x
            self.barrier.wait()
            total = self.parts[0] + self.parts[1]
            self.barrier.wait()  # both have read the parts before either writes the next
            return total

        return reduce_sum


def test_global_renorm_over_two_shards_equals_denoising_the_whole():
    params = GenerationParams(
        num_timesteps=6,
        cfg_text_scale=4.0,
        cfg_interval=(0.0, 1.0),
        cfg_renorm_type="global",
        cfg_renorm_min=0.0,
    )
    x0 = torch.randn(10, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    whole = denoise(x0, RowVelocities(slice(0, 10), (10, 16)), params)
    shards, sums, out = [slice(0, 4), slice(4, 10)], TwoShardSum(), [None, None]

    def rank(i: int) -> None:
        velocity = RowVelocities(shards[i], (10, 16))
        out[i] = denoise(x0[shards[i]], velocity, params, reduce_sum=sums.of(i))

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    torch.testing.assert_close(torch.cat(out), whole, rtol=1e-12, atol=1e-12)
    alone = denoise(x0[shards[0]], RowVelocities(shards[0], (10, 16)), params)
    assert (alone - whole[shards[0]]).abs().max() > 1e-3  # the test can tell
