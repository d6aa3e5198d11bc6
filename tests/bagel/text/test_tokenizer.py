"""The Qwen2 tokenizer path: the tiny locally trained tokenizer loads through transformers like
the real one, special tokens resolve by string, and prompts are framed <|im_start|> … <|im_end|>."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bagel.testing.tokenizer import write_tiny_tokenizer
from bagel.text.tokenizer import SPECIAL_TOKENS, PromptTokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-tokenizer")
    write_tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def tok(tiny_dir: Path) -> PromptTokenizer:
    return load_tokenizer(tiny_dir)


def test_special_tokens_are_the_qwen2_strings_bagel_uses() -> None:
    assert SPECIAL_TOKENS == (
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
    )


def test_tiny_tokenizer_writes_qwen2_files_and_a_small_vocab(tmp_path: Path) -> None:
    size = write_tiny_tokenizer(tmp_path, vocab_size=400)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"} <= names
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert size == 400
    assert load_tokenizer(tmp_path).vocab_size == size


def test_default_tiny_vocab_is_small_and_loaded_size_matches_written_size(tmp_path: Path) -> None:
    size = write_tiny_tokenizer(tmp_path)
    assert 256 + len(SPECIAL_TOKENS) < size <= 1024
    assert load_tokenizer(tmp_path).vocab_size == size


def test_vocab_size_below_byte_alphabet_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="byte alphabet"):
        write_tiny_tokenizer(tmp_path, vocab_size=100)


@pytest.mark.parametrize(
    "text",
    [
        "A photo of a red apple on a wooden table.",
        "Zebra-striped spaceship, ünïcödé 世界 🚀, it's 2024!\n\tnew line  spaces",
        "",
    ],
)
def test_tiny_tokenizer_round_trips_text(tok: PromptTokenizer, text: str) -> None:
    ids = tok.tokenizer.encode(text, add_special_tokens=False)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.tokenizer.decode(ids) == text


def test_common_words_become_single_tokens(tok: PromptTokenizer) -> None:
    # Trained merges are really used: a sentence from the corpus is far shorter than its bytes.
    text = "A photo of a red apple on a wooden table"
    assert len(tok.tokenizer.encode(text, add_special_tokens=False)) < len(text.encode()) / 2


def test_special_ids_resolve_by_string_and_are_distinct(tok: PromptTokenizer) -> None:
    assert set(tok.special_ids) == set(SPECIAL_TOKENS)
    assert len(set(tok.special_ids.values())) == len(SPECIAL_TOKENS)
    for token, token_id in tok.special_ids.items():
        assert tok.tokenizer.convert_tokens_to_ids(token) == token_id
        assert tok.tokenizer.convert_ids_to_tokens(token_id) == token
        assert 0 <= token_id < tok.vocab_size
    assert tok.start_of_image == tok.special_ids["<|vision_start|>"]
    assert tok.end_of_image == tok.special_ids["<|vision_end|>"]


def test_special_token_strings_in_text_encode_as_one_token(tok: PromptTokenizer) -> None:
    ids = tok.tokenizer.encode("<|vision_start|><|vision_end|>", add_special_tokens=False)
    assert ids == [tok.start_of_image, tok.end_of_image]


def test_encode_prompt_frames_text_with_im_start_and_im_end(tok: PromptTokenizer) -> None:
    text = "a cat on a sofa"
    body = tok.tokenizer.encode(text, add_special_tokens=False)
    ids = tok.encode_prompt(text)
    assert ids == [tok.special_ids["<|im_start|>"], *body, tok.special_ids["<|im_end|>"]]
    assert len(body) > 0
    assert tok.decode(ids) == "<|im_start|>a cat on a sofa<|im_end|>"


def test_empty_prompt_gives_exactly_the_two_framing_tokens(tok: PromptTokenizer) -> None:
    assert tok.encode_prompt("") == [tok.special_ids["<|im_start|>"], tok.special_ids["<|im_end|>"]]


def test_loading_a_directory_without_tokenizer_files_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "llm_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no Qwen2 tokenizer"):
        load_tokenizer(tmp_path / "does-not-exist")


def test_a_tokenizer_missing_a_special_token_is_rejected_by_name(tmp_path: Path) -> None:
    write_tiny_tokenizer(tmp_path)
    tokenizer_json = json.loads((tmp_path / "tokenizer.json").read_text())
    tokenizer_json["added_tokens"] = [
        t for t in tokenizer_json["added_tokens"] if t["content"] != "<|vision_end|>"
    ]
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {
        k: v for k, v in config["added_tokens_decoder"].items() if v["content"] != "<|vision_end|>"
    }
    config["additional_special_tokens"].remove("<|vision_end|>")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"<\|vision_end\|>"):
        load_tokenizer(tmp_path)


def test_writing_twice_gives_identical_files_even_across_processes(tmp_path: Path) -> None:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")
    first, second, third = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_tiny_tokenizer(first)
    write_tiny_tokenizer(second)
    # A fresh process has fresh hash seeds (Python and Rust), which would expose any dependence
    # of the trained merges on dictionary iteration order.
    code = f"from bagel.testing.tokenizer import write_tiny_tokenizer; write_tiny_tokenizer({str(third)!r})"
    root = Path(__file__).resolve().parents[3]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=60)
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
        assert (first / name).read_bytes() == (third / name).read_bytes(), name
