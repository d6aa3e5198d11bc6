"""The `none` policy: every step runs every layer."""

from __future__ import annotations

from dataclasses import dataclass

from step_cache.policy import PolicyConfig
from step_cache.registry import register


@register
@dataclass(frozen=True)
class NoCache(PolicyConfig):
    """Every step runs the whole transformer."""

    name = "none"
    wire_number = 1

    def policy(self) -> None:
        return None

    @classmethod
    def eager(cls) -> NoCache:
        return cls()
