"""TeaCache: reuse the whole transformer's residual while the relative L1 change of the first
block's input, summed since the last computed step, stays under a threshold.

BAGEL has no timestep modulation (the time embedding is added to the embedded latent tokens), so
the statistic is those tokens themselves, compared with the previous step's, computed or not. No
polynomial rescaling: none is fitted for BAGEL. The first and the last step always compute.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from serving.codecs import FloatCodec, Range, spec
from step_cache.policy import Policy, PolicyConfig, Statistic, Step
from step_cache.registry import register
from step_cache.taylorseer import Forecast


@register
@dataclass(frozen=True)
class TeaCache(Forecast, PolicyConfig):
    """Skip a step while the accumulated relative L1 change of the first block's input stays
    under the threshold."""

    name = "tea_cache"
    wire_number = 2

    rel_l1_threshold: float = field(
        default=0.2,
        metadata=spec(FloatCodec(), "TeaCache threshold", bounds=Range(0.0, 10.0), key="threshold"),
    )

    def policy(self) -> TeaCacheRule:
        return TeaCacheRule(self.rel_l1_threshold)

    @classmethod
    def eager(cls) -> TeaCache:
        return cls(rel_l1_threshold=10.0)


class TeaCacheRule(Policy):
    statistic = Statistic.FRONT_INPUT

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.accumulated = 0.0  # relative change summed since the last computed step

    def layer_ranges(self, num_layers: int) -> tuple[range, range, range]:
        return range(0), range(num_layers), range(num_layers, num_layers)

    def reuse(self, step: Step, change: float) -> bool:
        if step.is_first or step.is_last:
            return False
        return self.accumulated + change < self.threshold

    def record(self, step: Step, change: float, reused: bool) -> None:
        self.accumulated = self.accumulated + change if reused else 0.0
