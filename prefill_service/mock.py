"""A prefill service with synthetic KV and no language model: the same `bagel.v1.Prefill` API, for
tests and for users who bring their own prefill engine. `python -m prefill_service.mock --model DIR
--listen HOST:PORT --diffusion HOST:PORT [--dtype fp32|bf16]` reads only the configs in DIR.

The KV is deterministic in (prompt, negative prompt, seed) and has the model's shapes:
- contexts: `cond` from the prompt, `uncond_text` from the negative prompt (empty: 0 tokens), like
  `bagel.prompting.prompts.cfg_prompts`; next RoPE position = token count;
- token count of a non-empty text = 2 + ceil(UTF-8 bytes / 4): the two framing tokens plus about
  what a BPE tokenizer makes of English; no tokenizer is loaded;
- values: per context a generator seeded from (kind, text, seed); per layer K ~ N(0, 1) (the scale
  of QK-normed keys) then V ~ N(0, 0.5^2), drawn in fp32 and cast to the wire dtype.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from bagel.network.config import BagelConfig
from bagel.network.kv import Branch, ContextKV
from prefill_service.prefill import LayerKV, PlannedKV, check_prompt_text
from prefill_service.server import serve
from prefill_service.settings import PrefillSettings
from serving import flags
from serving.flags import option
from serving.params import GenerationParams
from serving.service.server import configure_logging
from serving.service.startup import check_port_free, exit_on_misconfiguration, require
from transport import ContextSpec

KEY_STD, VALUE_STD = 1.0, 0.5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROG = "python -m prefill_service.mock"


@dataclass(frozen=True)
class MockPrefillSettings(PrefillSettings):
    """Mock BAGEL prefill service: synthetic, seed-deterministic KV; no language model."""

    dtype: str = option("KV dtype", default="fp32", choices=tuple(sorted(DTYPES)))


def synthetic_token_count(text: str) -> int:
    return 2 + math.ceil(len(text.encode()) / 4) if text else 0


def _context_texts(prompt: str, params: GenerationParams) -> dict[Branch, str]:
    return {Branch.COND: prompt, Branch.UNCOND_TEXT: params.negative_prompt}


def _generator(kind: Branch, text: str, seed: int) -> torch.Generator:
    digest = hashlib.sha256(f"{kind}\0{seed}\0{text}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def synthetic_layers(
    config: BagelConfig, prompt: str, params: GenerationParams, dtype: torch.dtype = torch.float32
) -> Iterator[LayerKV]:
    """Layer by layer, (K, V) per context (cond, uncond_text) `[tokens, kv_heads, head_dim]`."""
    llm = config.llm
    seed = params.seed
    contexts = [
        (synthetic_token_count(text), _generator(kind, text, seed))
        for kind, text in _context_texts(prompt, params).items()
    ]
    for _ in range(llm.num_layers):
        pairs = []
        for tokens, gen in contexts:
            shape = (tokens, llm.num_kv_heads, llm.head_dim)
            k = torch.randn(shape, generator=gen) * KEY_STD
            v = torch.randn(shape, generator=gen) * VALUE_STD
            pairs.append((k.to(dtype), v.to(dtype)))
        yield pairs


def synthetic_contexts(
    config: BagelConfig, prompt: str, params: GenerationParams, dtype: torch.dtype = torch.float32
) -> dict[Branch, ContextKV]:
    """The whole synthetic cache the mock sends for this request, as the in-process pipeline
    takes it (`bagel.pipeline.Pipeline.denoise`)."""
    kinds = list(_context_texts(prompt, params))
    keys: list[list[torch.Tensor]] = [[] for _ in kinds]
    values: list[list[torch.Tensor]] = [[] for _ in kinds]
    for pairs in synthetic_layers(config, prompt, params, dtype):
        for i, (k, v) in enumerate(pairs):
            keys[i].append(k)
            values[i].append(v)
    return {
        kind: ContextKV(keys[i], values[i], next_rope_position=keys[i][0].shape[0])
        for i, kind in enumerate(kinds)
    }


class SyntheticKV:
    """The mock's `KVSource`: shapes and fingerprint from the checkpoint's configs only."""

    def __init__(
        self,
        model_dir: str | Path,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.config = BagelConfig.from_dir(model_dir)
        self.dtype = dtype

    def plan(
        self, prompt: str, params: GenerationParams, think_plan: str | None = None
    ) -> PlannedKV:
        """The mock decodes no text, so no think request reaches it (the text side refuses
        those first); a plan would only lengthen the conditional text."""
        check_prompt_text(prompt)
        if think_plan is not None:
            prompt += think_plan
        counts = {k: synthetic_token_count(t) for k, t in _context_texts(prompt, params).items()}
        contexts = tuple(ContextSpec(int(kind), n, n) for kind, n in counts.items())
        return PlannedKV(
            contexts, lambda: synthetic_layers(self.config, prompt, params, self.dtype)
        )


def config_fault(model_dir: str | Path) -> str | None:
    """Why the mock cannot read the model's shapes from `model_dir`, or None."""
    try:
        BagelConfig.from_dir(model_dir)
    except (OSError, ValueError, KeyError) as e:
        return f"--model {model_dir}: {e}"
    return None


def main(argv: list[str] | None = None) -> int:
    settings = flags.parse_settings(MockPrefillSettings, PROG, argv)
    with exit_on_misconfiguration():  # the mock reads only the configs, not the weights
        check_port_free(settings.listen)
        require(config_fault(settings.model_dir))
    configure_logging()
    dtype = DTYPES[settings.dtype]

    def load() -> SyntheticKV:
        return SyntheticKV(settings.model_dir, dtype)

    with exit_on_misconfiguration():  # e.g. an address gRPC cannot bind
        return asyncio.run(serve(settings, load))


if __name__ == "__main__":
    sys.exit(main())
