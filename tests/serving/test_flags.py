"""`serving.flags` (argparse generated from a settings dataclass), `serving.service.addresses`, and the
token file with several tokens."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from serving.flags import (
    OneLineArgumentParser,
    add_arguments,
    build_parser,
    detected,
    from_args,
    given_paths,
    group,
    option,
    parse_settings,
)
from serving.service.addresses import parse_host_port, split_addresses
from serving.service.security import SecurityError, read_token_set, token_accepted


@dataclass(frozen=True)
class Example:
    model: str = option("checkpoint")
    listen: str = option("where", default="127.0.0.1:1", metavar="HOST:PORT")
    workers: int = option("how many", default=2)
    timeout: float | None = option("seconds", default=None)
    colour: str = option("paint", default="red", choices=("red", "blue"))
    verbose: bool = option("say more", default=False)
    cache: bool = option("keep a cache", default=True)

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
        x: list = option("no", default=None)

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


@dataclass(frozen=True)
class Link:
    """`{peer}` in a group's helps reads the group's peer; its checks name flags unprefixed."""

    cert: str | None = option("certificate for {peer}", default=None)
    key: str | None = option("its key", default=None)
    sizes: tuple[int, ...] = option(
        "sizes", default=(1,), flag="size-list", parse=lambda t: tuple(map(int, t.split(",")))
    )

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("--cert and --key go together (not --certificate)")


DETECTED = []


@dataclass(frozen=True)
class Outer:
    """What the program is."""

    model_dir: str = option("checkpoint", flag="model")
    precision: Literal["bf16", "fp8"] = option("weights", default="bf16")
    upstream: Link = group(Link, prefix="up-", peer="the origin")
    own: Link = group(Link, peer="the mirror")
    found: int = detected("set by the environment", DETECTED.pop, default=0)


def parse_outer(*argv: str) -> Outer:
    DETECTED.append(7)
    return parse_settings(Outer, "prog", list(argv))


def test_groups_flag_names_parsers_literals_and_detected_fields():
    got = parse_outer(
        *("--model", "m", "--precision", "fp8", "--up-cert", "c", "--up-key", "k"),
        *("--up-size-list", "2,3", "--size-list", "4"),
    )
    assert got == Outer("m", "fp8", Link("c", "k", (2, 3)), Link(sizes=(4,)), 7)
    text = " ".join(build_parser(Outer, "prog").format_help().split())
    assert "What the program is." in text
    assert "--up-cert UP_CERT certificate for the origin" in text
    assert "--cert CERT certificate for the mirror" in text
    assert "--precision {bf16,fp8}" in text and "--model MODEL checkpoint" in text
    assert "--found" not in text and "set by the environment" not in text


def test_a_group_whose_helps_name_a_peer_needs_one():
    @dataclass
    class NoPeer:
        link: Link = group(Link, prefix="x-")

    with pytest.raises(TypeError, match="peer"):
        add_arguments(argparse.ArgumentParser(), NoPeer)


def test_a_group_error_names_the_flags_as_spelled(capsys):
    for argv, said in [
        (("--up-cert", "c"), "prog: error: --up-cert and --up-key go together (not --certificate)"),
        (("--key", "k"), "prog: error: --cert and --key go together (not --certificate)"),
        (("--precision", "fp16"), "prog: error: argument --precision: invalid choice"),
        (
            ("--size-list", "1,x"),
            "prog: error: argument --size-list: invalid literal for int() with base 10: 'x'",
        ),
    ]:
        with pytest.raises(SystemExit) as exited:
            parse_outer("--model", "m", *argv)
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(said) and err.count("\n") == 1, err


def test_the_given_paths_are_the_fields_the_command_line_names_defaults_included():
    assert given_paths(Outer, "prog", ["--model", "m"]) == {("model_dir",)}
    argv = ["--model", "m", "--precision", "bf16", "--up-size-list", "1", "--no-cache"]
    with pytest.raises(SystemExit):  # --no-cache is Example's, not Outer's
        given_paths(Outer, "prog", argv)
    assert given_paths(Outer, "prog", argv[:-1]) == {
        ("model_dir",),
        ("precision",),
        ("upstream", "sizes"),
    }
    assert given_paths(Example, "prog", ["--model", "m", "--no-cache", "--verbose"]) == {
        ("model",),
        ("cache",),
        ("verbose",),
    }


def test_resolve_gets_the_settings_and_the_given_fields_and_its_error_is_one_line(capsys):
    seen = []

    def resolve(settings: Outer, given):
        seen.append(given)
        if settings.precision == "fp8" and ("own", "cert") not in given:
            raise ValueError("--precision fp8 needs --cert")
        return settings

    DETECTED.append(7)
    got = parse_settings(Outer, "prog", ["--model", "m", "--cert", "c", "--key", "k"], resolve)
    assert got.own.cert == "c"
    assert seen == [{("model_dir",), ("own", "cert"), ("own", "key")}]
    DETECTED.append(7)
    with pytest.raises(SystemExit) as exited:
        parse_settings(Outer, "prog", ["--model", "m", "--precision", "fp8"], resolve)
    assert exited.value.code == 2
    assert capsys.readouterr().err == "prog: error: --precision fp8 needs --cert\n"


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


def test_a_field_without_option_metadata_is_named():
    @dataclass(frozen=True)
    class Bare:
        plain: int = 1

    with pytest.raises(TypeError, match=r"^Bare\.plain has no option\(\.\.\.\) metadata$"):
        add_arguments(argparse.ArgumentParser(), Bare)
