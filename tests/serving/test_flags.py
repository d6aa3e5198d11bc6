"""`serving.flags` (argparse generated from a settings dataclass), `serving.addresses`, and the
token file with several tokens."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from serving.addresses import parse_host_port, split_addresses
from serving.flags import OneLineArgumentParser, add_arguments, from_args, option, scalar_type
from serving.security import SecurityError, read_token_set, token_accepted


@dataclass(frozen=True)
class Example:
    model: str = field(metadata=option("checkpoint"))
    listen: str = field(default="127.0.0.1:1", metadata=option("where", metavar="HOST:PORT"))
    workers: int = field(default=2, metadata=option("how many"))
    timeout: float | None = field(default=None, metadata=option("seconds"))
    colour: str = field(default="red", metadata=option("paint", choices=("red", "blue")))
    verbose: bool = field(default=False, metadata=option("say more"))
    cache: bool = field(default=True, metadata=option("keep a cache"))

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError("--workers must be positive")


def parse(*argv: str) -> Example:
    parser = argparse.ArgumentParser()
    add_arguments(parser, Example)
    return from_args(Example, parser.parse_args(argv))


def test_every_field_is_one_flag_with_its_type_default_and_help():
    assert parse("--model", "m") == Example(model="m")
    got = parse(
        *("--model", "m", "--workers", "3", "--timeout", "1.5", "--colour", "blue"),
        *("--verbose", "--no-cache", "--listen", "h:2"),
    )
    assert got == Example("m", "h:2", 3, 1.5, "blue", True, False)
    parser = argparse.ArgumentParser()
    add_arguments(parser, Example)
    text = parser.format_help()
    for words in ("checkpoint", "--listen HOST:PORT", "how many (default: 2)", "--no-cache"):
        assert words in text, words


@pytest.mark.parametrize(
    "argv",
    [[], ["--model", "m", "--workers", "x"], ["--model", "m", "--colour", "green"]],
)
def test_bad_flags_are_refused(argv):
    with pytest.raises(SystemExit):
        parse(*argv)


def test_the_dataclass_checks_run():
    with pytest.raises(ValueError, match="--workers must be positive"):
        parse("--model", "m", "--workers", "0")


def test_a_field_without_option_metadata_or_of_an_unknown_type_is_refused():
    @dataclass
    class NoHelp:
        x: int = 1

    @dataclass
    class Listy:
        x: list = field(default_factory=list, metadata=option("no"))

    for cls in (NoHelp, Listy):
        with pytest.raises(TypeError):
            add_arguments(argparse.ArgumentParser(), cls)


def test_the_one_line_parser_exits_2_with_one_line(capsys):
    parser = OneLineArgumentParser(prog="prog")
    add_arguments(parser, Example)
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--bogus"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("prog: error: ") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("text", "want"),
    [("127.0.0.1:80", ("127.0.0.1", 80)), ("[::1]:0", ("::1", 0)), ("h:65535", ("h", 65535))],
)
def test_host_port_parses(text, want):
    assert parse_host_port(text, "--listen") == want


@pytest.mark.parametrize("text", ["80", "h:", ":80", "h:x", "h:65536", "h:-1"])
def test_a_bad_host_port_is_refused_naming_the_flag(text):
    with pytest.raises(ValueError, match="--listen"):
        parse_host_port(text, "--listen")


def test_address_lists():
    assert split_addresses("a:1, b:2", "--prefill") == ("a:1", "b:2")
    for bad in ("a:1,", "a:1,a:1", "a:1,b"):
        with pytest.raises(ValueError, match="--prefill"):
            split_addresses(bad, "--prefill")
    with pytest.raises(ValueError) as err:
        split_addresses("b:2,a:1,b:2,a:1", "--prefill")
    assert str(err.value) == "--prefill 'b:2,a:1,b:2,a:1': a:1, b:2 given more than once"


def test_a_token_file_holds_one_token_per_line(tmp_path: Path):
    path = tmp_path / "tokens"
    path.write_text("  old-token\n\nnew-token  \n")
    tokens = read_token_set(path)
    assert tokens == ("old-token", "new-token")
    assert token_accepted("new-token", tokens) and token_accepted("old-token", tokens)
    assert not token_accepted("new-toke", tokens)
    assert not token_accepted("", tokens)


@pytest.mark.parametrize("content", ["", "\n \n", "has space\n"])
def test_an_unusable_token_file_is_refused(tmp_path: Path, content):
    path = tmp_path / "tokens"
    path.write_text(content)
    with pytest.raises(SecurityError):
        read_token_set(path)


def test_option_is_the_help_metavar_and_choices():
    assert option("h", metavar="M", choices=("a", "b")) == {
        "help": "h",
        "metavar": "M",
        "choices": ("a", "b"),
    }


def test_scalar_types_and_their_optional_forms():
    assert scalar_type(int) == (int, False)
    assert scalar_type(float | None) == (float, True)
    assert scalar_type(bool | None) == (bool, True)
    for bad in (int | str, list | None, list):
        with pytest.raises(TypeError) as err:
            scalar_type(bad)
        assert str(err.value) == (
            f"a flag's field must be str, int, float or bool (or | None), got {bad}"
        )


def test_flags_of_two_word_fields_and_the_help_of_every_kind():
    @dataclass(frozen=True)
    class TwoWords:
        keep_cache: bool = field(default=True, metadata=option("keep the cache"))
        say_more: bool = field(default=False, metadata=option("say more"))
        time_limit: float | None = field(default=None, metadata=option("seconds"))
        max_items: int = field(default=4, metadata=option("items"))

    parser = argparse.ArgumentParser(prog="p")
    add_arguments(parser, TwoWords)
    got = from_args(TwoWords, parser.parse_args(["--no-keep-cache", "--say-more"]))
    assert got == TwoWords(keep_cache=False, say_more=True)
    text = " ".join(parser.format_help().split())
    for words in (
        "--no-keep-cache keep the cache",
        "--say-more say more",
        "--time-limit TIME_LIMIT seconds --max-items",
        "--max-items MAX_ITEMS items (default: 4)",
    ):
        assert words in text, words


def test_a_field_without_option_metadata_is_named():
    @dataclass(frozen=True)
    class Bare:
        plain: int = 1

    with pytest.raises(TypeError, match=r"^Bare\.plain has no option\(\.\.\.\) metadata$"):
        add_arguments(argparse.ArgumentParser(), Bare)
