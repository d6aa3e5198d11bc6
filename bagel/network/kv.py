"""A prefilled KV cache as the model takes it, and the names of the CFG branches.

`Branch` numbers its members as the wire's `bagel.v1.ContextKind` does (a test pins the two
together), so the transport's context kinds convert with `Branch(kind)` and back with `int`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from torch import Tensor


class Branch(enum.IntEnum):
    """The CFG branches of a generation, each denoised over its own prefilled context."""

    COND = 1  # the prompt
    UNCOND_TEXT = 2  # empty or the negative prompt
    UNCOND_IMG = 3  # the image-guidance context; absent where it equals COND (text-to-image)

    def __str__(self) -> str:
        return self.name.lower()


@dataclass
class ContextKV:
    """The prefilled KV cache of one CFG context: per layer `[tokens, kv_heads, head_dim]`, and
    the RoPE position the generation block takes after it."""

    keys: list[Tensor]
    values: list[Tensor]
    next_rope_position: int

    @property
    def num_tokens(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0
