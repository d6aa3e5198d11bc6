"""Streaming detokenization: the deltas concatenate to the decode of all tokens, and a delta
never ends inside a character that later tokens complete."""

from __future__ import annotations

from pathlib import Path

import pytest

from bagel.text.detokenizer import REPLACEMENT, Detokenizer
from bagel.text.tokenizer import load_tokenizer


@pytest.mark.parametrize("text", ["a red circle", "héllo wörld ✓ 猫 🐈 done", "\x01\x02 ok"])
def test_deltas_add_up_to_the_decoded_text(tiny_model_dir: Path, text: str):
    tokenizer = load_tokenizer(tiny_model_dir)
    ids = tokenizer.tokenizer.encode(text, add_special_tokens=False)
    detokenizer = Detokenizer(tokenizer)
    deltas = [detokenizer.add(t) for t in ids] + [detokenizer.flush()]
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert not any(d.endswith(REPLACEMENT) for d in deltas)
    if any(ord(c) > 127 for c in text):  # byte-level tokens split characters: some are held back
        assert "" in deltas[:-1]
