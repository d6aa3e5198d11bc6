"""Shared command-line plumbing of both services: defaults come from the settings dataclass, so
each is written once."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from serving.security import SecurityError, ServerSecurity

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


def add_server_security_arguments(parser: argparse.ArgumentParser) -> None:
    """--tls-cert, --tls-key, --tls-ca and --auth-token-file, the same in both services."""
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
        help="require 'authorization: Bearer <token>' with the token in FILE (health stays open)",
    )


def server_security_from_args(args: argparse.Namespace) -> ServerSecurity:
    """The flags of `add_server_security_arguments`; an inconsistent set exits with its reason."""
    try:
        return ServerSecurity(
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_ca=args.tls_ca,
            auth_token_file=args.auth_token_file,
        )
    except SecurityError as e:
        raise SystemExit(str(e)) from None
