"""TaylorSeer: instead of the last residual as it was, a reused step gets its Taylor forecast at
this step from the last computed ones. It is a calibrator, not a policy: any policy whose config
mixes in `Forecast` gets it, and the decision rule never sees it.

The forecast is Newton's form over divided differences of the residuals at their step indices,
so order N reproduces a polynomial of degree N in the step exactly. It needs N + 1 residuals and
uses a lower order while fewer have been computed. The arithmetic is duck-typed (anything with
`+ - * /`, `.float()` and `.to(dtype)`), so this module imports no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from serving.codecs import IntCodec, Range, spec

MAX_ORDER = 2


@dataclass(frozen=True)
class Forecast:
    """Mixed into a policy's config: the order of the reused residual's forecast. On the wire it
    is the policy message's `taylorseer_order` field; in a `--cache` spec, `+taylorseer:order=N`
    (`+taylorseer` alone: order 1)."""

    taylorseer_order: int = field(
        default=0,
        kw_only=True,
        metadata=spec(
            IntCodec(),
            "TaylorSeer order of the reused residual's forecast (0: reuse it as it is)",
            bounds=Range(0, MAX_ORDER),
            key="order",
            modifier="taylorseer",
            when_named=1,
        ),
    )


# A residual: the (markers, latents) pair `middle` added, one branch's rows.
Residual = tuple[Any, Any]


class TaylorSeer:
    """Forecasts a branch's residual from its history `[(step, residual), ...]`, oldest first."""

    def __init__(self, order: int) -> None:
        self.order = order

    @classmethod
    def of(cls, config: object) -> TaylorSeer:
        """The calibrator `config` asks for (order 0, plain reuse, if it mixes in no Forecast)."""
        return cls(getattr(config, "taylorseer_order", 0))

    @property
    def history_length(self) -> int:
        """How many residuals per branch the store must keep."""
        return self.order + 1

    def forecast(self, history: Sequence[tuple[int, Residual]], step: int) -> Residual:
        order = min(self.order, len(history) - 1)
        if order <= 0:
            return history[-1][1]
        steps = [s for s, _ in history[-(order + 1) :]]
        values = [r for _, r in history[-(order + 1) :]]
        return tuple(  # type: ignore[return-value]
            _newton([v[part].float() for v in values], steps, step).to(values[-1][part].dtype)
            for part in range(2)
        )


def _newton(ys: list[Any], xs: list[int], x: int) -> Any:
    """The interpolating polynomial through `(xs[i], ys[i])`, evaluated at `x`."""
    n = len(ys) - 1
    coeffs = list(ys)
    for level in range(1, n + 1):
        for i in range(n, level - 1, -1):
            coeffs[i] = (coeffs[i] - coeffs[i - 1]) / (xs[i] - xs[i - level])
    result = coeffs[n]
    for i in range(n - 1, -1, -1):
        result = coeffs[i] + (x - xs[i]) * result
    return result
