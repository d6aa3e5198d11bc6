"""The Qwen2 tokenizer as BAGEL uses it: loaded offline from a checkpoint directory through
transformers, special tokens looked up by string, prompts framed as <|im_start|> text <|im_end|>."""

from __future__ import annotations

from pathlib import Path

# The Qwen2.5 special tokens BAGEL relies on; in the real vocabulary their ids are 151643,
# 151644, 151645, 151652 and 151653. Always resolved by string, never by hard-coded id.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
)
PROMPT_START_TOKEN = "<|im_start|>"
PROMPT_END_TOKEN = "<|im_end|>"
IMAGE_START_TOKEN = "<|vision_start|>"
IMAGE_END_TOKEN = "<|vision_end|>"


class PromptTokenizer:
    """A loaded Qwen2 tokenizer plus the special-token ids BAGEL's prompt and image framing use."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        # Check membership in the vocabulary first: for a missing token convert_tokens_to_ids
        # silently returns the unknown-token id (or None), depending on the tokenizer.
        vocab = tokenizer.get_vocab()
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing} that BAGEL needs")
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        if len(set(ids.values())) != len(ids):
            raise ValueError(f"special tokens share ids: {ids}")
        self.special_ids: dict[str, int] = ids

    @property
    def vocab_size(self) -> int:
        """Number of tokens including added special tokens (`len(tokenizer)`)."""
        return len(self.tokenizer)

    @property
    def start_of_image(self) -> int:
        return self.special_ids[IMAGE_START_TOKEN]

    @property
    def end_of_image(self) -> int:
        return self.special_ids[IMAGE_END_TOKEN]

    def encode_prompt(self, text: str) -> list[int]:
        """`<|im_start|>` + text tokens + `<|im_end|>`, as BAGEL frames a text prompt."""
        body = self.tokenizer.encode(text, add_special_tokens=False)
        return [self.special_ids[PROMPT_START_TOKEN], *body, self.special_ids[PROMPT_END_TOKEN]]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def load_tokenizer(directory: str | Path) -> PromptTokenizer:
    """Load the Qwen2 tokenizer from a checkpoint directory (real BAGEL-7B-MoT or the tiny one)
    without touching the network."""
    directory = Path(directory)
    has_json = (directory / "tokenizer.json").is_file()
    has_bpe_files = (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()
    if not directory.is_dir() or not (has_json or has_bpe_files):
        raise FileNotFoundError(
            f"no Qwen2 tokenizer in {directory}: expected tokenizer.json or vocab.json + merges.txt "
            "(with tokenizer_config.json) as in the BAGEL-7B-MoT checkpoint"
        )
    # Importing the class directly (not AutoTokenizer) keeps a BAGEL `config.json` with an
    # unknown model_type from being consulted; the reference code does the same.
    from transformers import Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer.from_pretrained(str(directory), local_files_only=True)
    return PromptTokenizer(tokenizer)
