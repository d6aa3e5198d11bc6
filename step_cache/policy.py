"""What a step-cache policy is: a frozen config dataclass that travels in a request, and the
decision rule (`Policy`) one job runs with. Both import no torch.

A rule sees one number per decision: the largest relative L1 change of its statistic over the
CFG branches of the step, summed over every rank. It never sees ranks, tensors or residuals:
the runtime (`step_cache.collective`) measures, sums, stores and forecasts, so a rule cannot
forget to keep the reference its statistic is measured against.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from serving.errors import InvalidParams


class Statistic(enum.Enum):
    """The tensor whose relative change a rule reads, and which value it is compared with."""

    # The first block's input (the embedded latent tokens), against the previous step's.
    FRONT_INPUT = "front_input"
    # What the front layers added, against its value at the last computed step.
    FRONT_RESIDUAL = "front_residual"


@dataclass(frozen=True)
class Step:
    """The step a decision is taken for, as every rank sees it."""

    index: int  # 0-based
    total: int
    cached: int  # steps before this one served from the cache
    consecutive: int  # of those, how many directly precede this one

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.total - 1


class Policy(ABC):
    """One job's decision rule. `statistic` None: the rule decides from the step alone, and the
    runtime then measures nothing and communicates nothing."""

    statistic: ClassVar[Statistic | None]

    @abstractmethod
    def layer_ranges(self, num_layers: int) -> tuple[range, range, range]:
        """(front, middle, back): consecutive ranges covering `range(num_layers)`; `middle` is
        what a reused step skips."""

    @abstractmethod
    def reuse(self, step: Step, change: float) -> bool:
        """Whether `step` reuses `middle`. `change` is the statistic's relative change (0.0 for
        a rule without a statistic)."""

    def record(self, step: Step, change: float, reused: bool) -> None:  # noqa: B027 - optional
        """The decision taken for `step` (also when the runtime forced a compute because a
        branch had nothing stored yet): update the rule's own state."""


@dataclass(frozen=True)
class PolicyConfig:
    """A policy's request settings. A subclass is a frozen dataclass whose fields carry
    `serving.codecs.spec` metadata and match, by name, the fields of its proto message, the
    `name` member of `bagel.v1.CacheConfig.policy` at field number `wire_number`."""

    name: ClassVar[str]
    wire_number: ClassVar[int]

    def policy(self) -> Policy | None:
        """The rule of one job; None: every step computes every layer."""
        raise NotImplementedError(f"{type(self).__name__} defines no policy()")

    @classmethod
    def eager(cls) -> PolicyConfig:
        """Settings that reuse whenever the rule's limits allow and nothing changes; the generic
        policy tests run every registered policy with them."""
        raise NotImplementedError(f"{cls.__name__} defines no eager()")

    def check_fits(self, num_layers: int) -> None:
        """InvalidParams unless a model of `num_layers` layers leaves `middle` a layer to skip."""
        rule = self.policy()
        if rule is not None and len(rule.layer_ranges(num_layers)[1]) == 0:
            raise InvalidParams(
                f"cache policy {self.name} leaves none of the model's {num_layers} blocks to cache"
            )
