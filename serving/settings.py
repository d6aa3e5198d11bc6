"""Shared command-line plumbing of both services: defaults come from the settings dataclass, so
each is written once."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, NoReturn

from serving.security import INSECURE_TOKEN_FLAG, SecurityError, ServerSecurity

DEFAULT_METRICS_HOST = "127.0.0.1"


def default(settings_cls: type, name: str) -> Any:
    """The default of field `name` of the settings dataclass `settings_cls`."""
    for f in dataclasses.fields(settings_cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise ValueError(f"{settings_cls.__name__}.{name} has no default")
    raise KeyError(name)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """`--help` states each option's default, unless its help says it already or it has none
    (a required flag, an on/off switch, an unset optional)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            not action.option_strings
            or action.nargs == 0
            or action.default in (None, argparse.SUPPRESS)
            or "(default" in text
            or "%(default)" in text
        ):
            return text
        return f"{text} (default: %(default)s)"


def add_server_security_arguments(
    parser: argparse.ArgumentParser, *, allowed_clients: bool = False
) -> None:
    """--tls-cert, --tls-key, --tls-ca, --auth-token-file and --allow-insecure-token-file, the
    same in both services; `allowed_clients`: --tls-allowed-clients as well."""
    s = ServerSecurity
    parser.add_argument(
        "--tls-cert", default=default(s, "tls_cert"), metavar="PEM", help="serve TLS: certificate"
    )
    parser.add_argument(
        "--tls-key", default=default(s, "tls_key"), metavar="PEM", help="serve TLS: private key"
    )
    parser.add_argument(
        "--tls-ca",
        default=default(s, "tls_ca"),
        metavar="PEM",
        help="mTLS: require client certificates signed by this CA",
    )
    parser.add_argument(
        "--auth-token-file",
        default=default(s, "auth_token_file"),
        metavar="FILE",
        help="require 'authorization: Bearer <token>' with a token in FILE, one per line (health "
        "stays open); SIGHUP or a change of the file reloads it, like the TLS files",
    )
    parser.add_argument(
        INSECURE_TOKEN_FLAG,
        action="store_true",
        default=default(s, "allow_insecure_token_file"),
        help="start even if a token file is readable by every user",
    )
    if allowed_clients:
        parser.add_argument(
            "--tls-allowed-clients",
            type=client_names,
            default=default(s, "allowed_clients"),
            metavar="NAME[,NAME...]",
            help="mTLS: only client certificates with one of these SAN DNS names or URIs may call; "
            "others get PERMISSION_DENIED (default: any certificate --tls-ca signed)",
        )


def client_names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("name at least one SAN DNS name or URI")
    return names


def server_security_from_args(args: argparse.Namespace) -> ServerSecurity:
    """The flags of `add_server_security_arguments`; an inconsistent set exits with its reason."""
    try:
        return ServerSecurity(
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_ca=args.tls_ca,
            auth_token_file=args.auth_token_file,
            allowed_clients=getattr(args, "tls_allowed_clients", ()),
            allow_insecure_token_file=args.allow_insecure_token_file,
        )
    except SecurityError as e:
        refuse_to_start(e)


def refuse_to_start(error: Exception) -> NoReturn:
    """A misconfigured service: one line on stderr, exit status 2 (as argparse's errors)."""
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(2) from None
