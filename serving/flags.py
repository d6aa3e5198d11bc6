"""Command-line flags generated from a settings dataclass: each field is one flag, `--field-name`,
whose help (and optional metavar, choices, flag name or parser) sits beside the field as
`option(...)` metadata, and whose type and default come from the field itself. Writing a flag is
writing a field; the settings are built from the parsed flags by the same walk.

Field types: str, int, float, bool (default False: `--name` sets it; default True: `--no-name`
clears it), a `Literal` of strings (its values are the choices), each optionally `| None`
(default None: unset); any other type names its `parse=` (text -> value). A field without a
default is a required flag. A field whose type is a settings dataclass and whose metadata is
`group(...)` contributes that dataclass's flags, named with the group's prefix; a field whose
metadata is `detected(...)` is no flag: its value is read from the process's environment.

Errors of a group's own checks name its flags unprefixed (`--tls-cert`); the walk renames them
as the command line spells them (`--diffusion-tls-cert`).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

SCALARS = (str, int, float)
FLAG = re.compile(r"--[a-z][a-z0-9-]*")


def option(
    help: str,
    *,
    metavar: str | None = None,
    choices: tuple[str, ...] | None = None,
    flag: str | None = None,
    parse: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """A settings field's flag metadata: `field(default=..., metadata=option("..."))`. `flag`:
    the flag's name without the dashes when it is not the field's (`model` for `model_dir`);
    `parse`: text -> value, for a field of another type than those above (it raises ValueError,
    TypeError or argparse.ArgumentTypeError on bad text)."""
    return {"help": help, "metavar": metavar, "choices": choices, "flag": flag, "parse": parse}


def group(*, prefix: str = "", peer: str | None = None) -> dict[str, Any]:
    """Metadata of a field whose type is a settings dataclass: its fields are flags too, each
    named `--{prefix}{name}`; `{peer}` in their helps reads `peer`."""
    return {"group": prefix, "peer": peer}


def detected(help: str, detect: Callable[[], Any]) -> dict[str, Any]:
    """Metadata of a field that is no flag: `detect()` gives its value when the flags are read."""
    return {"help": help, "detect": detect}


@dataclasses.dataclass(frozen=True)
class Flag:
    """One flag: where its value goes (`path`: the field names from the outer settings down),
    its field, and how the command line spells it."""

    path: tuple[str, ...]
    field: dataclasses.Field
    annotation: Any
    name: str  # "--tls-cert"
    peer: str | None

    @property
    def dest(self) -> str:
        return self.name.removeprefix("--").replace("-", "_")

    @property
    def required(self) -> bool:
        f = self.field
        return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING

    @property
    def default(self) -> Any:
        """The field's default (None for a required flag)."""
        if self.required:
            return None
        if self.field.default is not dataclasses.MISSING:
            return self.field.default
        return self.field.default_factory()  # type: ignore[misc]

    @property
    def kind(self) -> tuple[Any, tuple[str, ...] | None]:
        """(what turns the flag's text into the value, the choices)."""
        meta = self.field.metadata
        if meta["parse"] is not None:
            return meta["parse"], meta["choices"]
        kind, choices = scalar_type(self.annotation)
        return kind, meta["choices"] or choices

    @property
    def help(self) -> str:
        text = self.field.metadata["help"]
        return text if self.peer is None else text.replace("{peer}", self.peer)


def flags(settings_cls: type, prefix: str = "", peer: str | None = None) -> Iterator[Flag]:
    """Every flag of `settings_cls`, its groups' included, in field order."""
    hints = typing.get_type_hints(settings_cls)
    for f in dataclasses.fields(settings_cls):
        meta = f.metadata
        if "group" in meta:
            if not dataclasses.is_dataclass(hints[f.name]):
                raise TypeError(f"{settings_cls.__name__}.{f.name}: a group is a dataclass")
            for inner in flags(hints[f.name], prefix + meta["group"], meta["peer"] or peer):
                yield dataclasses.replace(inner, path=(f.name, *inner.path))
            continue
        if "detect" in meta:
            continue
        if "help" not in meta:
            raise TypeError(f"{settings_cls.__name__}.{f.name} has no option(...) metadata")
        if "{peer}" in meta["help"] and peer is None:
            raise TypeError(
                f"{settings_cls.__name__}.{f.name}'s help names a peer; no group gives it"
            )
        yield Flag((f.name,), f, hints[f.name], "--" + prefix + _name(f), peer)


def add_arguments(parser: argparse.ArgumentParser, settings_cls: type) -> None:
    """One flag per field of the dataclass `settings_cls` (and of its groups)."""
    for flag in flags(settings_cls):
        _add(parser, flag)


def _add(parser: argparse.ArgumentParser, flag: Flag) -> None:
    (kind, choices), default = flag.kind, flag.default
    if kind is bool:
        if default:
            name = "--no-" + flag.name.removeprefix("--")
            parser.add_argument(name, dest=flag.dest, action="store_false", help=flag.help)
        else:
            parser.add_argument(flag.name, dest=flag.dest, action="store_true", help=flag.help)
        return
    shown = "" if default is None or "(default" in flag.help else f" (default: {default})"
    parser.add_argument(
        flag.name,
        dest=flag.dest,
        type=kind,
        default=default,
        required=flag.required,
        metavar=flag.field.metadata["metavar"],
        choices=choices,
        help=flag.help + shown,
    )


def scalar_type(annotation: Any) -> tuple[Any, tuple[str, ...] | None]:
    """(the scalar type, the choices a `Literal` names) of a field's resolved annotation, which
    may be `| None`."""
    members = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else ()
    if members:
        kinds = [m for m in members if m is not type(None)]
        if len(kinds) == 1 and len(members) == 2:
            annotation = kinds[0]
    if typing.get_origin(annotation) is typing.Literal:
        values = typing.get_args(annotation)
        if all(isinstance(v, str) for v in values):
            return str, values
    elif annotation in (*SCALARS, bool):
        return annotation, None
    raise TypeError(
        "a flag's field must be str, int, float, bool or a Literal of strings (or | None), or "
        f"name its parse=; got {annotation}"
    )


def from_args(settings_cls: type, args: argparse.Namespace) -> Any:
    """The settings the parsed flags give (the dataclasses' own checks run; a group's errors
    name its flags as the command line spells them)."""
    return _build(settings_cls, args, "", ())


def _build(settings_cls: type, args: argparse.Namespace, prefix: str, path: tuple[str, ...]):
    hints = typing.get_type_hints(settings_cls)
    values = {}
    for f in dataclasses.fields(settings_cls):
        meta = f.metadata
        if "group" in meta:
            values[f.name] = _build(hints[f.name], args, prefix + meta["group"], (*path, f.name))
        elif "detect" in meta:
            values[f.name] = meta["detect"]()
        else:
            values[f.name] = getattr(args, (prefix + _name(f)).replace("-", "_"))
    try:
        return settings_cls(**values)
    except ValueError as e:
        if not prefix:
            raise
        own = {"--" + _name(f) for f in dataclasses.fields(settings_cls)}
        renamed = FLAG.sub(lambda m: "--" + prefix + m[0][2:] if m[0] in own else m[0], str(e))
        raise type(e)(renamed) from None


def _name(f: dataclasses.Field) -> str:
    """The flag's name without its dashes and any group prefix."""
    return f.metadata.get("flag") or f.name.replace("_", "-")


class OneLineArgumentParser(argparse.ArgumentParser):
    """Bad flags end the process with exit status 2 and one line on stderr, no usage block."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser(settings_cls: type, prog: str, description: str) -> OneLineArgumentParser:
    parser = OneLineArgumentParser(prog=prog, description=description)
    add_arguments(parser, settings_cls)
    return parser


def parse_settings(settings_cls: type, parser: argparse.ArgumentParser, argv: list[str] | None):
    """The settings `argv` (None: the command line) gives; a bad flag or a setting the
    dataclasses refuse ends the process with one line and exit status 2."""
    args = parser.parse_args(argv)
    try:
        return from_args(settings_cls, args)
    except ValueError as e:
        parser.error(str(e))
