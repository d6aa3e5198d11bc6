"""Command-line flags generated from a settings dataclass: each field is one flag, `--field-name`,
whose help (and optional metavar or choices) sits beside the field as `option(...)` metadata, and
whose type and default come from the field itself. Writing a flag is writing a field.

Field types: str, int, float, bool (default False: `--name` sets it; default True: `--no-name`
clears it), each optionally `| None` (default None: unset). A field without a default is a
required flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from typing import Any, NoReturn

SCALARS = (str, int, float)


def option(
    help: str, *, metavar: str | None = None, choices: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """A settings field's flag metadata: `field(default=..., metadata=option("..."))`."""
    return {"help": help, "metavar": metavar, "choices": choices}


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def scalar_type(annotation: Any) -> tuple[type, bool]:
    """(the scalar type, whether None is allowed) of a field's resolved annotation."""
    members = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else ()
    if members:
        kinds = [m for m in members if m is not type(None)]
        if len(kinds) == 1 and len(members) == 2 and kinds[0] in (*SCALARS, bool):
            return kinds[0], True
    elif annotation in (*SCALARS, bool):
        return annotation, False
    raise TypeError(f"a flag's field must be str, int, float or bool (or | None), got {annotation}")


def add_arguments(parser: argparse.ArgumentParser, settings_cls: type) -> None:
    """One flag per field of the dataclass `settings_cls`."""
    hints = typing.get_type_hints(settings_cls)
    for f in dataclasses.fields(settings_cls):
        meta = f.metadata
        if "help" not in meta:
            raise TypeError(f"{settings_cls.__name__}.{f.name} has no option(...) metadata")
        kind, _ = scalar_type(hints[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else _default(f)
        if kind is bool:
            if default:
                parser.add_argument(
                    "--no-" + f.name.replace("_", "-"),
                    dest=f.name,
                    action="store_false",
                    help=meta["help"],
                )
            else:
                parser.add_argument(
                    flag_name(f.name), dest=f.name, action="store_true", help=meta["help"]
                )
            continue
        shown = "" if default is None else f" (default: {default})"
        parser.add_argument(
            flag_name(f.name),
            dest=f.name,
            type=kind,
            default=default,
            required=required,
            metavar=meta.get("metavar"),
            choices=meta.get("choices"),
            help=meta["help"] + shown,
        )


def from_args(settings_cls: type, args: argparse.Namespace) -> Any:
    """The settings the parsed flags give (the dataclass's own checks run)."""
    return settings_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(settings_cls)})


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


class OneLineArgumentParser(argparse.ArgumentParser):
    """Bad flags end the process with exit status 2 and one line on stderr, no usage block."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)
