"""The CFG contexts of a text-to-image request, as token ids: the one place that says which
contexts exist and what goes into each."""

from __future__ import annotations

from bagel.network.kv import Branch
from bagel.text.tokenizer import PromptTokenizer


def cfg_prompts(
    tokenizer: PromptTokenizer, prompt: str, negative_prompt: str = ""
) -> dict[Branch, list[int]]:
    """`cond` = `<|im_start|>` prompt `<|im_end|>`; `uncond_text` = empty (BAGEL's default) or the
    framed negative prompt. Text-to-image has no separate `uncond_img`: it equals `cond`."""
    return {
        Branch.COND: tokenizer.encode_prompt(prompt),
        Branch.UNCOND_TEXT: tokenizer.encode_prompt(negative_prompt) if negative_prompt else [],
    }
