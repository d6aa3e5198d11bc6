"""`serving.settings`: defaults read from the settings dataclass, `--help` stating them, and the
security flags both services share, an inconsistent set refused with one line and exit 2."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from serving.security import ServerSecurity
from serving.settings import (
    DEFAULT_METRICS_HOST,
    DefaultsHelpFormatter,
    add_server_security_arguments,
    client_names,
    default,
    refuse_to_start,
    server_security_from_args,
)


@dataclasses.dataclass
class Example:
    required: str
    plain: int = 3
    listed: list = dataclasses.field(default_factory=lambda: [1, 2])


def test_default_reads_a_value_or_a_factory_and_names_a_field_without_one():
    assert default(Example, "plain") == 3
    first, second = default(Example, "listed"), default(Example, "listed")
    assert first == [1, 2] and first is not second  # a fresh value from the factory each time
    with pytest.raises(ValueError, match="^Example.required has no default$"):
        default(Example, "required")
    with pytest.raises(KeyError, match="nope"):
        default(Example, "nope")
    assert DEFAULT_METRICS_HOST == "127.0.0.1"


def _help(*add) -> str:
    parser = argparse.ArgumentParser(prog="p", formatter_class=DefaultsHelpFormatter)
    for args, kwargs in add:
        parser.add_argument(*args, **kwargs)
    return " ".join(parser.format_help().split())


def test_help_states_a_default_only_where_it_says_something():
    text = _help(
        (("--steps",), {"default": 50, "help": "steps"}),
        (("--said",), {"default": 1, "help": "said (default 1)"}),
        (("--templated",), {"default": 2, "help": "templated %(default)s"}),
        (("--unset",), {"default": None, "help": "unset"}),
        (("--switch",), {"action": "store_true", "help": "switch"}),
        (("--hidden",), {"default": argparse.SUPPRESS, "help": "hidden"}),
        (("name",), {"default": "x", "nargs": "?", "help": "positional"}),
    )
    assert "steps (default: 50)" in text
    assert "said (default 1) --templated" in text
    assert "templated 2 --unset" in text
    assert "unset --switch" in text
    assert "switch --hidden" in text
    assert "hidden" in text and "hidden (default" not in text
    assert "name positional options" in text  # a positional's default is not stated
    assert text.count("(default:") == 1


def _parser(allowed_clients: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p")
    if allowed_clients:
        add_server_security_arguments(parser, allowed_clients=True)
    else:
        add_server_security_arguments(parser)  # --tls-allowed-clients only when asked for
    return parser


def test_the_security_flags_default_to_the_dataclass_and_map_onto_it():
    args = _parser().parse_args([])
    assert server_security_from_args(args) == ServerSecurity()
    assert not hasattr(args, "tls_allowed_clients")
    args = _parser(allowed_clients=True).parse_args([])
    assert server_security_from_args(args) == ServerSecurity()  # allowed_clients ()
    args = _parser(allowed_clients=True).parse_args(
        [
            "--tls-cert=c",
            "--tls-key=k",
            "--tls-ca=a",
            "--auth-token-file=t",
            "--allow-insecure-token-file",
            "--tls-allowed-clients= x, y ,",
        ]
    )
    assert server_security_from_args(args) == ServerSecurity(
        tls_cert="c",
        tls_key="k",
        tls_ca="a",
        auth_token_file="t",
        allowed_clients=("x", "y"),
        allow_insecure_token_file=True,
    )


def test_the_security_flags_help_says_what_each_does():
    text = " ".join(_parser(allowed_clients=True).format_help().split())
    for fragment in (
        "--tls-cert PEM serve TLS: certificate",
        "--tls-key PEM serve TLS: private key",
        "--tls-ca PEM mTLS: require client certificates signed by this CA",
        "--auth-token-file FILE require 'authorization: Bearer <token>' with a token in FILE, "
        "one per line (health stays open); SIGHUP or a change of the file reloads it, like the "
        "TLS files",
        "--allow-insecure-token-file start even if a token file is readable by every user",
        "--tls-allowed-clients NAME[,NAME...] mTLS: only client certificates with one of these "
        "SAN DNS names or URIs may call; others get PERMISSION_DENIED (default: any certificate "
        "--tls-ca signed)",
    ):
        assert fragment in text


def test_client_names_are_split_and_at_least_one_is_needed():
    assert client_names("a, b,,c ") == ("a", "b", "c")
    with pytest.raises(argparse.ArgumentTypeError, match="^name at least one SAN DNS name or URI$"):
        client_names(" , ")


def test_an_inconsistent_set_of_flags_refuses_to_start_with_one_line(capsys):
    args = _parser().parse_args(["--tls-cert", "c"])
    with pytest.raises(SystemExit) as exit_:
        server_security_from_args(args)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: --tls-cert and --tls-key go together\n"


def test_refuse_to_start_prints_the_error_and_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        refuse_to_start(ValueError("no model"))
    assert exit_.value.code == 2 and exit_.value.__cause__ is None
    assert exit_.value.__suppress_context__
    assert capsys.readouterr() == ("", "error: no model\n")
