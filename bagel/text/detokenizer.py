"""Decoded tokens -> text as it grows. A byte-level BPE token may hold part of a UTF-8 character,
so text is released only up to the last complete character: the deltas concatenate to exactly
the decode of all tokens."""

from __future__ import annotations

from bagel.text.tokenizer import PromptTokenizer

REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 sequence decodes to


class Detokenizer:
    """Decodes a short window of recent tokens per step, not the whole text: the window starts
    at the tokens before the last release, so a multi-token character is decoded whole."""

    def __init__(self, tokenizer: PromptTokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self._prefix = 0  # the window's first token
        self._read = 0  # tokens whose text has been released

    def add(self, token: int) -> str:
        """The text `token` completes (possibly empty)."""
        self.tokens.append(token)
        return self._release(final=False)

    def flush(self) -> str:
        """Whatever is still held back (the end of the text)."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        before = self.tokenizer.decode(self.tokens[self._prefix : self._read])
        text = self.tokenizer.decode(self.tokens[self._prefix :])
        if len(text) <= len(before) or (text.endswith(REPLACEMENT) and not final):
            return ""
        self._prefix, self._read = self._read, len(self.tokens)
        return text[len(before) :]
