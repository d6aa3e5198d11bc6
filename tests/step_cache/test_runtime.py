"""The step-cache runtime's collective side on thread ranks (`tests/helpers/thread_ranks.py`):
ranks whose own statistics disagree decide together, a CFG group that runs none of a step's
branches takes part by abstaining, and `world_sum` sums a copy. Then the pieces the policies
lean on: the residual store, the base config's errors and DBCache's fit check."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from bagel.diffusion.step_cache import NoStepCache
from bagel.network.kv import Branch
from serving.errors import InvalidParams
from step_cache import collective
from step_cache.collective import CollectiveStepCache, make_step_cache, measure, world_sum
from step_cache.policies.dbcache import DBCache
from step_cache.policies.none import NoCache
from step_cache.policies.teacache import TeaCache
from step_cache.policy import Policy, PolicyConfig, Statistic, Step
from step_cache.registry import POLICIES, _load_policies, register
from step_cache.store import ResidualStore, stack
from step_cache.taylorseer import TaylorSeer
from tests.helpers.thread_ranks import ThreadGroup, ThreadWorld

COND = (Branch.COND,)


@pytest.fixture
def threads(monkeypatch):
    def install(world: int) -> ThreadWorld:
        fake = ThreadWorld(world)
        monkeypatch.setattr(collective, "dist", fake)
        return fake

    return install


def _perturbed(rank: int) -> list[int]:
    """Rank 1's Fn residual changes a lot, rank 0's not at all: alone, rank 0 would reuse."""
    cache = CollectiveStepCache(
        DBCache(fn_compute_blocks=1, max_warmup_steps=0, residual_diff_threshold=0.1),
        valid_rows=4,
        reduce=world_sum(),
    )
    decisions = []
    front_in = (torch.zeros(1, 2, 8), torch.zeros(1, 4, 8))
    for step in range(4):
        cache.begin_step(step, 4, COND)
        scale = 1.0 if rank == 0 or step < 2 else 5.0 * step
        front_out = (torch.zeros(1, 2, 8), torch.full((1, 4, 8), scale))
        reuse = cache.reuse_middle(COND, front_in, front_out)
        if not reuse:
            cache.store_middle_residual(COND, (torch.ones(1, 2, 8), torch.ones(1, 4, 8)))
        decisions.append(int(reuse))
    return decisions


def test_thread_ranks_agree_when_one_rank_alone_would_decide_otherwise(threads):
    world = threads(2)
    # Step 0 has no state, step 1 sees no change; steps 2 and 3 see rank 1's jump everywhere.
    assert world.run(_perturbed) == [[0, 1, 0, 0], [0, 1, 0, 0]]
    assert world.all_reduces == 2 * 4


def test_pad_rows_beyond_the_valid_ones_are_not_measured(threads):
    """Rows past `valid_rows` change wildly; the decision only sees the real rows."""

    def run(rank: int) -> list[bool]:
        cache = CollectiveStepCache(TeaCache(rel_l1_threshold=0.5), 2, world_sum())
        out = []
        for step in range(3):
            cache.begin_step(step, 4, COND)
            rows = torch.ones(1, 4, 3)
            rows[:, 2:] = 100.0 * (step + 1) * (rank + 1)  # pad rows
            state = (torch.zeros(1, 2, 3), rows)
            out.append(cache.reuse_middle(COND, state, state))
            if not out[-1]:
                cache.store_middle_residual(COND, (torch.zeros(1, 2, 3), torch.zeros(1, 4, 3)))
        return out

    assert threads(2).run(run) == [[False, True, True]] * 2


def test_a_group_without_the_steps_branch_abstains_and_decides_with_the_others(threads):
    """CFG parallel: rank 0 runs the conditional branch, rank 1 runs no branch at step 1
    and abstains; both decide from rank 0's numbers, and the abstaining rank keeps no state."""

    def run(rank: int) -> dict:
        cache = CollectiveStepCache(TeaCache(rel_l1_threshold=0.5), 3, world_sum())
        decisions = []
        for step in range(4):
            cache.begin_step(step, 4, COND)
            if rank == 0:
                state = (torch.zeros(1, 2, 2), torch.full((1, 3, 2), 1.0 + 0.1 * step))
                decisions.append(cache.reuse_middle(COND, state, state))
                if not decisions[-1]:
                    cache.store_middle_residual(COND, (torch.zeros(1, 2, 2), torch.zeros(1, 3, 2)))
            else:
                cache.abstain()
                decisions.append(cache.step_was_cached)
        cache.begin_step(4, 4, COND)
        return {"decisions": decisions, "cached": cache._cached, "refs": sorted(cache.references)}

    zero, one = threads(2).run(run)
    # Changes 0.1, 0.09, 0.083 accumulate to 0.19 then 0.27: under 0.5; the last step computes.
    assert zero["decisions"] == one["decisions"] == [False, True, True, False]
    assert zero["cached"] == one["cached"] == 2
    assert zero["refs"] == [Branch.COND] and one["refs"] == []


def test_abstaining_alone_reuses_nothing_and_sends_zero_sums():
    sent = []

    def reduce(x: torch.Tensor) -> torch.Tensor:
        sent.append(x.clone())
        return x

    cache = CollectiveStepCache(TeaCache(rel_l1_threshold=10.0), 3, reduce)
    for step in range(3):
        cache.begin_step(step, 4, COND)
        cache.abstain()
    cache.begin_step(3, 4, COND)
    assert cache._cached == 0  # an abstaining rank with no sums sees an infinite change
    assert len(sent) == 3
    for x in sent:
        assert x.dtype == torch.float64 and x.shape == (len(Branch), 2)
        assert not x.any()


class _Stepwise(PolicyConfig):
    """A rule that reuses odd steps and records the change and the step it is given; it reads
    `statistic` (None: no statistic)."""

    name = "stepwise"
    wire_number = 98

    def __init__(self, statistic: Statistic | None = None) -> None:
        self.changes: list[float] = []
        self.steps: list[Step] = []
        self.statistic = statistic

    def policy(self) -> Policy:
        changes, steps = self.changes, self.steps

        class Rule(Policy):
            statistic = self.statistic

            def layer_ranges(self, num_layers: int) -> tuple[range, range, range]:
                return range(1), range(1, num_layers), range(num_layers, num_layers)

            def reuse(self, step: Step, change: float) -> bool:
                return step.index % 2 == 1

            def record(self, step: Step, change: float, reused: bool) -> None:
                changes.append(change)
                steps.append(step)

        return Rule()


def test_a_rule_without_a_statistic_decides_from_the_step_with_a_zero_change():
    for abstaining in (False, True):
        config = _Stepwise()
        cache = CollectiveStepCache(config, 3, lambda x: pytest.fail("a sum was taken"))
        decisions = []
        for step in range(4):
            cache.begin_step(step, 4, COND)
            if abstaining:
                cache.abstain()
            else:
                state = (torch.zeros(1, 2, 2), torch.full((1, 3, 2), float(step)))
                cache.reuse_middle(COND, state, state)
            decisions.append(cache.step_was_cached)
        # Every rank knows step 0 computed the conditional branch, abstaining or not.
        assert decisions == [False, True, False, True], abstaining
        assert config.changes == [0.0] * 4
        assert config.steps == [
            Step(0, 4, 0, 0),
            Step(1, 4, 0, 0),
            Step(2, 4, 1, 1),
            Step(3, 4, 1, 0),
        ]


def test_world_sum_adds_every_ranks_tensor_into_a_copy(threads):
    def run(rank: int):
        x = torch.full((2,), float(rank + 1), dtype=torch.float64)
        total = world_sum()(x)
        return x, total

    for x, total in threads(3).run(run):
        assert total.tolist() == [6.0, 6.0]
        assert total.dtype == torch.float64
        assert x.tolist() != [6.0, 6.0]  # the caller's tensor is left alone


def test_world_sum_over_a_group_adds_only_its_members(threads):
    pairs = [ThreadGroup((0, 1)), ThreadGroup((2, 3))]

    def run(rank: int):
        return world_sum(group=pairs[rank // 2])(torch.tensor([float(rank)])).item()

    assert threads(4).run(run) == [1.0, 1.0, 5.0, 5.0]


def test_world_sum_is_the_identity_alone(threads, monkeypatch):
    x = torch.ones(2)
    assert world_sum()(x) is x  # no torch.distributed in this process
    world = threads(1)
    assert world.run(lambda rank: world_sum()(x) is x) == [True]
    assert world.all_reduces == 0


def test_make_step_cache_builds_the_runtime_only_for_a_caching_policy():
    assert isinstance(make_step_cache(None, 3, world_sum()), NoStepCache)
    assert isinstance(make_step_cache(NoCache(), 3, world_sum()), NoStepCache)
    cache = make_step_cache(TeaCache(), 3, world_sum())
    assert isinstance(cache, CollectiveStepCache) and cache.valid_rows == 3
    with pytest.raises(ValueError, match="^NoCache computes every step: use NoStepCache$"):
        CollectiveStepCache(NoCache(), 3, world_sum())


def test_the_store_keeps_the_last_residuals_per_branch_and_says_which_it_holds():
    store = ResidualStore(2)
    assert not store.holds(Branch.COND)
    for step in range(3):
        residual = (torch.full((2, 1), float(step)), torch.full((2, 3), float(step)))
        store.add(step, (Branch.COND, Branch.UNCOND_TEXT), residual)
    assert store.holds(Branch.COND) and store.holds(Branch.UNCOND_TEXT)
    assert not store.holds(Branch.UNCOND_IMG)
    assert [s for s, _ in store.history(Branch.COND)] == [1, 2]
    with pytest.raises(ValueError, match="keeps at least one residual, not 0"):
        ResidualStore(0)


def test_a_config_without_its_rule_or_eager_settings_says_which_is_missing():
    class Bare(PolicyConfig):
        name = "bare"
        wire_number = 99

    with pytest.raises(NotImplementedError, match=r"^Bare defines no policy\(\)$"):
        Bare().policy()
    with pytest.raises(NotImplementedError, match=r"^Bare defines no eager\(\)$"):
        Bare.eager()


def test_db_cache_fits_while_one_block_is_left_between_fn_and_bn():
    DBCache(fn_compute_blocks=2, bn_compute_blocks=1).check_fits(4)
    with pytest.raises(InvalidParams) as err:
        DBCache(fn_compute_blocks=2, bn_compute_blocks=2).check_fits(4)
    assert str(err.value) == (
        "cache.fn_compute_blocks + cache.bn_compute_blocks = 4 leaves none of the model's 4 "
        "blocks to cache; the sum must be below 4"
    )


def test_world_sum_over_a_group_of_one_is_the_identity_in_a_larger_world(threads):
    world = threads(2)
    x = torch.ones(2)
    assert world.run(lambda rank: world_sum(group=ThreadGroup((rank,)))(x) is x) == [True, True]
    assert world.all_reduces == 0


def test_world_sum_moves_the_sums_to_the_given_device(threads):
    def run(rank: int) -> str:
        return world_sum(device="meta")(torch.ones(2)).device.type

    assert threads(2).run(run) == ["meta", "meta"]


@dataclasses.dataclass(frozen=True)
class Unserved(PolicyConfig):
    name = "unserved"
    wire_number = 97

    def policy(self) -> None:
        return None


def test_make_step_cache_hands_the_runtime_its_reduce():
    def reduce(x):
        return x

    assert make_step_cache(TeaCache(), 3, reduce).reduce is reduce


def test_a_policy_clashing_by_name_or_by_wire_number_is_refused():
    @dataclasses.dataclass(frozen=True)
    class SameName(Unserved):
        name = "tea_cache"
        wire_number = 96

    @dataclasses.dataclass(frozen=True)
    class SameNumber(Unserved):
        name = "other"
        wire_number = 2

    with pytest.raises(ValueError) as err:
        register(SameName)
    assert str(err.value) == (
        "cache policy SameName (tea_cache, field 96) clashes with TeaCache (tea_cache, field 2)"
    )
    with pytest.raises(ValueError, match=r"^cache policy SameNumber \(other, field 2\) clashes"):
        register(SameNumber)
    assert list(POLICIES) == ["none", "tea_cache", "db_cache"]


def test_loading_the_policies_again_keeps_the_registry_as_it_is():
    _load_policies()
    assert list(POLICIES) == ["none", "tea_cache", "db_cache"]


def test_the_rules_split_the_layers_into_front_middle_and_back():
    db = DBCache(fn_compute_blocks=2, bn_compute_blocks=3).policy()
    assert db.layer_ranges(10) == (range(0, 2), range(2, 7), range(7, 10))
    cache = CollectiveStepCache(DBCache(fn_compute_blocks=1), 3, world_sum())
    assert cache.layer_ranges(4) == (range(0, 1), range(1, 4), range(4, 4))
    tea = TeaCache().policy()
    assert tea.layer_ranges(6) == (range(0, 0), range(0, 6), range(6, 6))


def test_the_statistics_read_the_input_or_what_the_front_layers_added():
    markers = torch.zeros(1, 2, 2)
    before, after = torch.full((1, 3, 2), 2.0), torch.full((1, 3, 2), 7.0)
    assert torch.equal(measure(Statistic.FRONT_INPUT, (markers, before), (markers, after)), before)
    added = measure(Statistic.FRONT_RESIDUAL, (markers, before), (markers, after))
    assert torch.equal(added, torch.full((1, 3, 2), 5.0))


def test_a_branch_whose_reference_sums_to_zero_is_left_out_of_the_change():
    """COND's reference is all zeros (no relative change can be taken); UNCOND_TEXT's rows are
    small (their sum is below 1) and still: the step reuses on UNCOND_TEXT's change of 0."""
    cache = CollectiveStepCache(TeaCache(rel_l1_threshold=0.5), 3, lambda x: x)
    branches = (Branch.COND, Branch.UNCOND_TEXT)
    markers = torch.zeros(2, 2, 2)
    decisions = []
    for step, cond in enumerate((0.0, 1.0)):
        cache.begin_step(step, 4, branches)
        latents = torch.stack([torch.full((3, 2), cond), torch.full((3, 2), 0.01)])
        decisions.append(cache.reuse_middle(branches, (markers, latents), (markers, latents)))
        if not decisions[-1]:
            cache.store_middle_residual(branches, (markers, latents))
    assert decisions == [False, True]


def test_the_store_and_stack_keep_the_markers_and_the_latents_apart():
    markers = torch.arange(4.0).reshape(2, 2, 1)
    latents = torch.arange(10.0, 16.0).reshape(2, 3, 1)
    store = ResidualStore(1)
    store.add(0, (Branch.COND, Branch.UNCOND_TEXT), (markers, latents))
    [(step, (m, x))] = store.history(Branch.UNCOND_TEXT)
    assert step == 0 and torch.equal(m, markers[1]) and torch.equal(x, latents[1])
    stacked = stack([store.history(b)[0][1] for b in (Branch.UNCOND_TEXT, Branch.COND)])
    assert torch.equal(stacked[0], markers.flip(0)) and torch.equal(stacked[1], latents.flip(0))


def test_a_forecast_uses_only_the_last_order_plus_one_residuals_in_their_dtype():
    def entry(step: int, value: float):
        return step, (torch.tensor([value], dtype=torch.bfloat16), torch.tensor([value]))

    # The first point is off the line through the last two: order 1 ignores it.
    history = [entry(0, 100.0), entry(1, 2.0), entry(2, 4.0)]
    markers, latents = TaylorSeer(1).forecast(history, 4)
    assert markers.dtype == torch.bfloat16 and latents.dtype == torch.float32
    assert markers.item() == 8.0 and latents.item() == 8.0


def test_tea_cache_starts_with_nothing_accumulated():
    rule = TeaCache(rel_l1_threshold=0.5).policy()
    assert rule.accumulated == 0.0
    assert rule.reuse(Step(1, 4, 0, 0), 0.4)


def test_the_eager_settings_are_the_loosest_each_rule_allows():
    assert DBCache.eager() == DBCache(
        fn_compute_blocks=1, max_warmup_steps=1, residual_diff_threshold=10.0
    )
    assert TeaCache.eager() == TeaCache(rel_l1_threshold=10.0)


def test_the_change_is_taken_in_fp32_and_summed_in_fp64_over_the_valid_rows():
    """The rule is handed exactly sum|current - reference| / sum|reference| with fp64 sums,
    and every rank's sums travel as one fp64 tensor."""
    gen = torch.Generator().manual_seed(0)
    first, second = torch.rand(1, 5000, 3, generator=gen), torch.rand(1, 5000, 3, generator=gen)
    config = _Stepwise(Statistic.FRONT_INPUT)
    sent = []

    def reduce(x: torch.Tensor) -> torch.Tensor:
        sent.append(x.dtype)
        return x

    cache = CollectiveStepCache(config, 4000, reduce)
    for step, latents in enumerate((first, second)):
        cache.begin_step(step, 4, COND)
        cache.reuse_middle(COND, (torch.zeros(1, 2, 3), latents), (torch.zeros(1, 2, 3), latents))
    current, reference = second[0, :4000], first[0, :4000]
    expected = (current - reference).abs().double().sum() / reference.abs().double().sum()
    assert config.changes[0] == math.inf  # nothing to compare with yet
    assert config.changes[1] == pytest.approx(expected.item(), rel=1e-13, abs=0)
    assert sent == [torch.float64, torch.float64]


def test_a_config_without_a_forecast_reuses_its_residual_as_it_is():
    assert TaylorSeer.of(_Stepwise()).order == 0
    assert TaylorSeer.of(DBCache(taylorseer_order=2)).order == 2
