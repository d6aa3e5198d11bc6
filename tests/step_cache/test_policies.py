"""Every registered step-cache policy, through the generic interface with synthetic statistics
whose right decisions are known in advance: it caches, it computes a step whose branch has
nothing stored, it follows branches by identity, and TaylorSeer forecasts a polynomial of its
order exactly. Then each policy's own rule, exact at every limit."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bagel.network.kv import Branch
from protos import params_pb2
from step_cache.policies.dbcache import DBCache
from step_cache.policies.teacache import TeaCache
from step_cache.policy import Policy, PolicyConfig, Statistic, Step
from step_cache.registry import POLICIES
from step_cache.taylorseer import MAX_ORDER, Forecast, TaylorSeer
from tests.step_cache.synthetic import assert_reuses_when_nothing_changes, constant, drive, rows

CACHING = [cls for cls in POLICIES.values() if cls.eager().policy() is not None]
FORECASTING = [cls for cls in CACHING if issubclass(cls, Forecast)]
BOTH = (Branch.COND, Branch.UNCOND_TEXT)
by_name = pytest.mark.parametrize("cls", CACHING, ids=lambda cls: cls.name)


def test_the_registry_holds_the_served_policies_and_the_generic_tests_see_every_caching_one():
    wire = params_pb2.CacheConfig.DESCRIPTOR.oneofs_by_name["policy"]
    assert list(POLICIES) == [f.name for f in wire.fields]
    assert [cls for name, cls in POLICIES.items() if name != "none"] == CACHING
    assert {TeaCache, DBCache} <= set(CACHING) and FORECASTING == CACHING
    assert POLICIES["none"]().policy() is None  # the one policy that never caches, by design


@by_name
def test_every_policy_reuses_steps_when_nothing_changes(cls):
    assert_reuses_when_nothing_changes(cls.eager())


@dataclasses.dataclass(frozen=True)
class NeverCaches(PolicyConfig):
    """A broken policy: its rule never says reuse."""

    name = "never"
    wire_number = 99

    def policy(self) -> Policy:
        class Never(Policy):
            statistic = Statistic.FRONT_RESIDUAL

            def layer_ranges(self, n):
                return range(1), range(1, n), range(n, n)

            def reuse(self, step, change):
                return False

        return Never()


def test_the_generic_check_fails_a_policy_that_can_never_cache():
    with pytest.raises(AssertionError, match="NeverCaches never reused a step: CCCCCCCC"):
        assert_reuses_when_nothing_changes(NeverCaches())


@by_name
def test_every_policy_computes_a_step_where_a_branch_has_nothing_stored_yet(cls):
    # The unconditional branch joins at step 4 (a CFG window opening mid-run) and leaves at 6.
    stats = constant(1.0, 4) + constant(1.0, 2, (Branch.COND, Branch.UNCOND_TEXT))
    run = drive(cls.eager(), stats + constant(1.0, 2))
    assert not run.decisions[0] and not run.decisions[4]
    assert run.decisions[5], run.pattern()  # both branches hold a residual by then


@by_name
def test_every_policy_follows_a_branch_by_identity_not_by_its_place_in_the_batch(cls):
    """The branches' statistics differ by 100x and swap places every step; both jump 1000x at
    step 3, which runs them in swapped order, so every policy computes it. Statistics or
    residuals kept by position would mix the branches; kept by branch, the decisions are those
    of a fixed order and each branch gets back its own last residual."""

    def stats(swapped: bool) -> list[dict[Branch, float]]:
        out = []
        for k in range(8):
            scale = 1000.0 if k >= 3 else 1.0
            order = (Branch.UNCOND_TEXT, Branch.COND) if swapped and k % 2 else BOTH
            out.append({b: scale * (1.0 if b == Branch.COND else 100.0) for b in order})
        return out

    def residual(step: int, branch: Branch) -> float:
        return 10.0 * step + int(branch)

    fixed = drive(cls.eager(), stats(swapped=False), residual)
    run = drive(cls.eager(), stats(swapped=True), residual)
    assert run.pattern() == fixed.pattern()
    assert not run.decisions[3] and run.cached, run.pattern()
    for step, served in run.served.items():
        last = max(k for k in range(step) if not run.decisions[k])
        for branch in BOTH:
            assert torch.equal(served[branch], rows(residual(last, branch))), (step, branch)


def _forcing_computes(steps_computed: int, total: int) -> list[dict[Branch, float]]:
    """A statistic that jumps 1000x at each of the first `steps_computed` steps (so every
    policy computes them), then holds still (so an eager policy reuses)."""
    return [{Branch.COND: 1000.0 ** min(k, steps_computed - 1)} for k in range(total)]


@pytest.mark.parametrize("order", range(MAX_ORDER + 1))
@pytest.mark.parametrize("cls", FORECASTING, ids=lambda cls: cls.name)
def test_taylorseer_of_order_n_forecasts_a_polynomial_of_degree_n_exactly(cls, order):
    config = dataclasses.replace(cls.eager(), taylorseer_order=order)
    total = order + 5

    def poly(degree):
        return lambda step, branch: float(sum((step + 1) ** d for d in range(degree + 1)))

    exact = drive(config, _forcing_computes(order + 1, total), residual=poly(order))
    assert exact.cached and exact.cached[0] == order + 1, exact.pattern()
    for step, served in exact.served.items():
        assert torch.allclose(served[Branch.COND], rows(poly(order)(step, None)), rtol=1e-6)
    higher = drive(config, _forcing_computes(order + 1, total), residual=poly(order + 1))
    step = higher.cached[0]
    miss = (higher.served[step][Branch.COND] - rows(poly(order + 1)(step, None))).abs().max()
    assert miss > 0.5  # one residual too few (a lower order) or one degree too many: inexact


def test_taylorseer_keeps_order_plus_one_residuals_and_uses_a_lower_order_while_short():
    seer = TaylorSeer(2)
    assert seer.history_length == 3
    history = [(0, (torch.tensor(1.0), torch.tensor(1.0)))]
    assert seer.forecast(history, 5)[1].item() == 1.0  # one residual: reused as it is
    history.append((2, (torch.tensor(3.0), torch.tensor(3.0))))
    assert seer.forecast(history, 5)[1].item() == 6.0  # two: the line through them
    history.append((3, (torch.tensor(10.0), torch.tensor(10.0))))
    # three: the parabola through (0, 1), (2, 3), (3, 10) is 2x^2 - 3x + 1, 36 at x = 5
    assert seer.forecast(history, 5)[1].item() == pytest.approx(36.0)


# ---- each policy's own rule -------------------------------------------------------------


def eager_db(**kw) -> DBCache:
    return dataclasses.replace(DBCache.eager(), **kw)


def test_db_cache_caps_reuses_in_a_row_and_a_computed_step_restarts_the_count():
    assert drive(eager_db(max_continuous_cached_steps=2), constant(1.0, 9)).pattern() == (
        "CRRCRRCRR"
    )
    # A jump at step 2 computes it: the run of reuses restarts there, not at the cap.
    stats = [{Branch.COND: 1.0 if k < 2 else 1000.0} for k in range(9)]
    assert drive(eager_db(max_continuous_cached_steps=2), stats).pattern() == "CRCRRCRRC"


@pytest.mark.parametrize("cap", [1, 3])
def test_db_cache_serves_exactly_max_cached_steps(cap):
    run = drive(eager_db(max_cached_steps=cap), constant(1.0, 8))
    assert run.cached == list(range(1, cap + 1))


@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_db_cache_computes_exactly_the_warmup_steps_first(warmup):
    run = drive(eager_db(max_warmup_steps=warmup), constant(1.0, 6))
    assert run.cached == list(range(max(warmup, 1), 6))  # step 0 has nothing stored yet


def test_db_cache_compares_with_the_last_computed_step_so_slow_drift_adds_up():
    """The statistic grows 5% a step. Against the previous step it would never pass 12%;
    against the last computed step it does every third step."""
    stats = [{Branch.COND: 1.05**k} for k in range(10)]
    run = drive(eager_db(residual_diff_threshold=0.12), stats)
    assert run.pattern() == "CRRCRRCRRC"


def test_db_cache_threshold_is_exclusive():
    stats = [{Branch.COND: v} for v in (1.0, 1.5, 2.25)]  # 50% a step
    assert drive(eager_db(residual_diff_threshold=0.5), stats).pattern() == "CCC"
    # Just above: step 1 reuses, so step 2 is compared with step 0 (125%) and computes.
    assert drive(eager_db(residual_diff_threshold=0.5 + 1e-9), stats).pattern() == "CRC"


def test_tea_cache_accumulates_the_change_and_resets_it_after_a_computed_step():
    """Each step changes the input by 50% of the previous one: under a threshold of 1.2 the sum
    allows two reuses (0.5, 1.0), the third (1.5) computes and starts the sum again. The first
    and the last step always compute."""
    stats = [{Branch.COND: 1.5**k} for k in range(10)]
    assert drive(TeaCache(rel_l1_threshold=1.2), stats).pattern() == "CRRCRRCRRC"


def test_tea_cache_threshold_is_exclusive():
    stats = [{Branch.COND: v} for v in (1.0, 1.5, 2.25, 2.25)]  # 50%, 50%, then no change
    assert drive(TeaCache(rel_l1_threshold=0.5), stats).pattern() == "CCCC"
    assert drive(TeaCache(rel_l1_threshold=0.5 + 1e-9), stats).pattern() == "CRCC"


def test_tea_cache_compares_the_input_with_the_previous_step_computed_or_not():
    stats = [{Branch.COND: 1.05**k} for k in range(6)]  # 5% a step, 12% allowed in all
    # 0.05 + 0.05 = 0.10 < 0.12, then 0.15 computes: the accumulator, not the reference,
    # carries the drift.
    assert drive(TeaCache(rel_l1_threshold=0.12), stats).pattern() == "CRRCRC"


def test_rules_see_the_step_they_decide_for():
    seen: list[Step] = []

    class Spy(Policy):
        statistic = None

        def layer_ranges(self, n):
            return range(0), range(n), range(n, n)

        def reuse(self, step, change):
            seen.append(step)
            return step.index % 3 != 0

    @dataclasses.dataclass(frozen=True)
    class SpyConfig(PolicyConfig):
        name = "spy"
        wire_number = 98

        def policy(self):
            return Spy()

    run = drive(SpyConfig(), constant(1.0, 7))
    assert run.pattern() == "CRRCRRC" and run.reduce_calls == 0
    # Step 0 is decided by the runtime (nothing stored yet); the rule sees the others.
    assert [(s.index, s.total, s.cached, s.consecutive) for s in seen] == [
        (1, 7, 0, 0),
        (2, 7, 1, 1),
        (3, 7, 2, 2),
        (4, 7, 2, 0),
        (5, 7, 3, 1),
        (6, 7, 4, 2),
    ]
