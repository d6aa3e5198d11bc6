"""Cache-DiT's DBCache (dual-block cache): the first Fn and the last Bn blocks run every step;
the middle blocks' residual is reused while the relative L1 change of what the first Fn blocks
added, against its value at the last computed step (so error cannot creep), stays under a
threshold, after a warm-up and within caps on cached steps in all and in a row."""

from __future__ import annotations

from dataclasses import dataclass, field

from serving.codecs import FloatCodec, IntCodec, Range, spec
from serving.errors import InvalidParams
from step_cache.policy import Policy, PolicyConfig, Statistic, Step
from step_cache.registry import register
from step_cache.taylorseer import Forecast


@register
@dataclass(frozen=True)
class DBCache(Forecast, PolicyConfig):
    """Cache-DiT's dual-block cache: the first Fn and last Bn blocks run every step; the middle
    blocks' residual is reused while the relative change of the first Fn blocks' residual stays
    under the threshold. A limit of 0 means no limit."""

    name = "db_cache"
    wire_number = 3

    fn_compute_blocks: int = field(
        default=8,
        metadata=spec(
            IntCodec(),
            "DBCache Fn: blocks computed first, every step",
            bounds=Range(1, 1000),
            key="fn",
        ),
    )
    bn_compute_blocks: int = field(
        default=0,
        metadata=spec(
            IntCodec(),
            "DBCache Bn: blocks computed last, every step",
            bounds=Range(0, 1000),
            key="bn",
        ),
    )
    max_warmup_steps: int = field(
        default=8,
        metadata=spec(
            IntCodec(), "steps always computed at the start", bounds=Range(0, 1000), key="warmup"
        ),
    )
    max_cached_steps: int = field(
        default=0,
        metadata=spec(
            IntCodec(),
            "most steps served from the cache (0: no limit)",
            bounds=Range(0, 1000),
            key="max_cached",
            zero_means_unlimited=True,
        ),
    )
    max_continuous_cached_steps: int = field(
        default=0,
        metadata=spec(
            IntCodec(),
            "most cached steps in a row (0: no limit)",
            bounds=Range(0, 1000),
            key="max_continuous",
            zero_means_unlimited=True,
        ),
    )
    residual_diff_threshold: float = field(
        default=0.08,
        metadata=spec(
            FloatCodec(),
            "DBCache relative residual change threshold",
            bounds=Range(0.0, 10.0),
            key="threshold",
        ),
    )

    def policy(self) -> DBCacheRule:
        return DBCacheRule(self)

    @classmethod
    def eager(cls) -> DBCache:
        return cls(fn_compute_blocks=1, max_warmup_steps=1, residual_diff_threshold=10.0)

    def check_fits(self, num_layers: int) -> None:
        used = self.fn_compute_blocks + self.bn_compute_blocks
        if used >= num_layers:
            raise InvalidParams(
                f"cache.fn_compute_blocks + cache.bn_compute_blocks = {used} leaves none of the "
                f"model's {num_layers} blocks to cache; the sum must be below {num_layers}"
            )


class DBCacheRule(Policy):
    statistic = Statistic.FRONT_RESIDUAL

    def __init__(self, config: DBCache) -> None:
        self.config = config

    def layer_ranges(self, num_layers: int) -> tuple[range, range, range]:
        fn, bn = self.config.fn_compute_blocks, self.config.bn_compute_blocks
        return range(fn), range(fn, num_layers - bn), range(num_layers - bn, num_layers)

    def reuse(self, step: Step, change: float) -> bool:
        c = self.config
        if step.index < c.max_warmup_steps:
            return False
        if c.max_cached_steps and step.cached >= c.max_cached_steps:
            return False
        if c.max_continuous_cached_steps and step.consecutive >= c.max_continuous_cached_steps:
            return False
        return change < c.residual_diff_threshold
