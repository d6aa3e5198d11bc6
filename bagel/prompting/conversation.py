"""What BAGEL's text side reads, as segments (`bagel.prompting.contexts`): a conversation to answer
(understanding, chat) and the contexts of "think" before generating or editing, as the
reference's `interleave_inference` builds them.

- Understanding: [system prompt if think] then each message's parts in order (text framed as
  `<|im_start|>` text `<|im_end|>`, an image through the ViT only), then `<|im_start|>`, from
  which the answer is decoded until `<|im_end|>`.
- Think + generate / edit: the system prompt goes into `cond` and `uncond_img`; an input image
  (an edit) into `cond` only, after which `uncond_text` is `cond` as it stands; the prompt into
  `cond` and `uncond_img`; the plan is decoded from `cond` and appended to it alone.
"""

from __future__ import annotations

from collections.abc import Sequence

from bagel.network.kv import Branch
from bagel.prompting.contexts import Segment, SegmentKind, num_tokens, text_segment
from bagel.text.tokenizer import PROMPT_START_TOKEN, PromptTokenizer

# The reference's system prompts (ByteDance-Seed/Bagel `inferencer.py`), to the character.
VLM_THINK_SYSTEM_PROMPT = (
    "You should first think about the reasoning process in the mind and then provide the user "
    "with the answer. \nThe reasoning process is enclosed within <think> </think> tags, i.e. "
    "<think> reasoning process here </think> answer here"
)
GEN_THINK_SYSTEM_PROMPT = (
    "You should first think about the planning process in the mind and then generate the "
    "image. \nThe planning process is enclosed within <think> </think> tags, i.e. <think> "
    "planning process here </think> image here"
)

# One part of a message: text, or the image's segments (a ViT segment for understanding).
Part = str | Sequence[Segment]


def decoding_start(tokenizer: PromptTokenizer) -> list[Segment]:
    """The token decoding starts from (the reference feeds `<|im_start|>` first)."""
    return text_segment([tokenizer.special_ids[PROMPT_START_TOKEN]])


def understanding_segments(
    tokenizer: PromptTokenizer, parts: Sequence[Part], think: bool
) -> list[Segment]:
    """The context an answer is decoded from, `decoding_start` included."""
    segments = text_segment(tokenizer.encode_prompt(VLM_THINK_SYSTEM_PROMPT)) if think else []
    for part in parts:
        if isinstance(part, str):
            segments += text_segment(tokenizer.encode_prompt(part))
        else:
            segments += list(part)
    return segments + decoding_start(tokenizer)


def plan_segments(
    tokenizer: PromptTokenizer, prompt: str, image: Sequence[Segment] = ()
) -> list[Segment]:
    """The context a think request's plan is decoded from: system prompt, the input image's
    segments (an edit), the prompt, then `decoding_start`."""
    system = text_segment(tokenizer.encode_prompt(GEN_THINK_SYSTEM_PROMPT))
    prompt_ids = tokenizer.encode_prompt(prompt)
    return [*system, *image, *text_segment(prompt_ids), *decoding_start(tokenizer)]


def think_segments(
    tokenizer: PromptTokenizer,
    prompt: str,
    plan: str,
    negative_prompt: str = "",
    image: Sequence[Segment] = (),
) -> dict[Branch, list[Segment]]:
    """The three CFG contexts of a think request once its `plan` is decoded. A negative prompt
    goes where the reference's empty text context would be: after `uncond_text`'s image."""
    system = text_segment(tokenizer.encode_prompt(GEN_THINK_SYSTEM_PROMPT))
    prompt_seg = text_segment(tokenizer.encode_prompt(prompt))
    negative = text_segment(tokenizer.encode_prompt(negative_prompt)) if negative_prompt else []
    return {
        Branch.COND: [*system, *image, *prompt_seg, *text_segment(tokenizer.encode_prompt(plan))],
        Branch.UNCOND_TEXT: [*system, *image, *negative],
        Branch.UNCOND_IMG: [*system, *prompt_seg],
    }


def token_ids(segments: Sequence[Segment]) -> list[int]:
    """All-text segments as one token list: consecutive text segments are one causal run at
    consecutive positions, so their prefill is a plain prompt's."""
    if any(s.kind is not SegmentKind.TEXT for s in segments):
        raise ValueError("token_ids takes text segments only")
    return [t for s in segments for t in s.token_ids]


def prompt_tokens(segments: Sequence[Segment]) -> int:
    return num_tokens(segments)
