"""A step-cache policy added as one module, as a new product policy would be in
`step_cache/policies/` (plus its message in `params.proto`): it reuses every step whose index is
not a multiple of `period`. It decides by the step index alone, so it reads no statistic and the
runtime runs no all-reduce for it. `tests/step_cache/test_new_policy.py` registers it."""

from __future__ import annotations

from dataclasses import dataclass, field

from serving.codecs import IntCodec, Range, spec
from step_cache.policy import Policy, PolicyConfig, Step
from step_cache.registry import register
from step_cache.taylorseer import Forecast


@register
@dataclass(frozen=True)
class EveryOtherStep(Forecast, PolicyConfig):
    """Compute every `period`-th step, reuse the others."""

    name = "every_other_step"
    wire_number = 4

    period: int = field(
        default=2,
        metadata=spec(IntCodec(), "compute every PERIOD-th step", bounds=Range(2, 100), key="p"),
    )

    def policy(self) -> EveryOtherStepRule:
        return EveryOtherStepRule(self.period)

    @classmethod
    def eager(cls) -> EveryOtherStep:
        return cls(period=2)


class EveryOtherStepRule(Policy):
    statistic = None

    def __init__(self, period: int) -> None:
        self.period = period

    def layer_ranges(self, num_layers: int) -> tuple[range, range, range]:
        return range(1), range(1, num_layers), range(num_layers, num_layers)

    def reuse(self, step: Step, change: float) -> bool:
        return step.index % self.period != 0
