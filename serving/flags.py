"""Command-line flags generated from a settings dataclass: each field is one flag, `--field-name`,
declared as `name: type = option(help, default=...)` with an optional metavar, choices, flag name
or parser; its type comes from the annotation. Writing a flag is writing a field; the settings
are built from the parsed flags by the same walk.

Field types: str, int, float, bool (default False: `--name` sets it; default True: `--no-name`
clears it), a `Literal` of strings (its values are the choices), each optionally `| None`
(default None: unset); any other type names its `parse=` (text -> value). A field without a
default is a required flag. A field named `..._s` holds seconds: its flag leaves the `_s` out
(`connect_timeout_s`: `--connect-timeout S`). A field declared `group(SettingsClass,
prefix=...)` contributes that dataclass's flags, named with the group's prefix; a field declared
`detected(...)` is no flag: its value is read from the process's environment. The parser's
description is the settings dataclass's docstring.

Errors of a group's own checks name its flags unprefixed (`--tls-cert`); the walk renames them
as the command line spells them (`--diffusion-tls-cert`). `parse_settings(..., resolve=...)`
hands the settings and the fields the command line named to a function that fills in the rest
(a preset: a flag given wins over it).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

FieldPath = tuple[str, ...]  # a field's names from the outer settings down: ("parallel", "ring")

SCALARS = (str, int, float)
SECONDS = "_s"  # the name of a field in seconds ends so: `drain_s`
FLAG = re.compile(r"--[a-z][a-z0-9-]*")


def option(
    help: str,
    *,
    default: Any = dataclasses.MISSING,
    metavar: str | None = None,
    choices: tuple[str, ...] | None = None,
    flag: str | None = None,
    parse: Callable[[str], Any] | None = None,
) -> Any:
    """A settings field that is a flag: `listen: str = option("HOST:PORT to serve on",
    default="127.0.0.1:1")` (no default: a required flag). `flag`: the flag's name without the
    dashes when it is not the field's (`model` for `model_dir`); `parse`: text -> value, for a
    field of another type than those above (it raises ValueError, TypeError or
    argparse.ArgumentTypeError on bad text)."""
    meta = {"help": help, "metavar": metavar, "choices": choices, "flag": flag, "parse": parse}
    return dataclasses.field(default=default, metadata=meta)


def group(settings_cls: type, *, prefix: str = "", peer: str | None = None) -> Any:
    """A field of the settings dataclass `settings_cls` (its defaults by default) whose fields
    are flags too, each named `--{prefix}{name}`; `{peer}` in their helps reads `peer`."""
    return dataclasses.field(default_factory=settings_cls, metadata={"group": prefix, "peer": peer})


def detected(help: str, detect: Callable[[], Any], *, default: Any) -> Any:
    """A settings field that is no flag: `detect()` gives its value when the flags are read."""
    return dataclasses.field(default=default, metadata={"help": help, "detect": detect})


@dataclasses.dataclass(frozen=True)
class Flag:
    """One flag: where its value goes (`path`: the field names from the outer settings down),
    its field, and how the command line spells it."""

    path: FieldPath
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
        type=kind if flag.field.metadata["parse"] is None else _saying_why(kind),
        default=default,
        required=flag.required,
        metavar=flag.field.metadata["metavar"]
        or ("S" if flag.field.name.endswith(SECONDS) else None),
        choices=choices,
        help=flag.help + shown,
    )


def _saying_why(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse`, its ValueError's own words in argparse's one-line error."""

    def parsed(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parsed


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
    return _build(settings_cls, args, "")


def _build(settings_cls: type, args: argparse.Namespace, prefix: str) -> Any:
    hints = typing.get_type_hints(settings_cls)
    values = {}
    for f in dataclasses.fields(settings_cls):
        meta = f.metadata
        if "group" in meta:
            values[f.name] = _build(hints[f.name], args, prefix + meta["group"])
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
    """The flag's name without its dashes and any group prefix; a duration's (`..._s`, in
    seconds) leaves the unit out."""
    return f.metadata.get("flag") or f.name.removesuffix(SECONDS).replace("_", "-")


class OneLineArgumentParser(argparse.ArgumentParser):
    """Bad flags end the process with exit status 2 and one line on stderr, no usage block."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser(settings_cls: type, prog: str) -> OneLineArgumentParser:
    """The flags of `settings_cls`; its docstring is what `--help` says the program is."""
    parser = OneLineArgumentParser(prog=prog, description=inspect.getdoc(settings_cls))
    add_arguments(parser, settings_cls)
    return parser


def given_paths(
    settings_cls: type, prog: str, argv: list[str] | None = None
) -> frozenset[FieldPath]:
    """The fields whose flags `argv` names, a flag given with its default's value included."""
    parser = build_parser(settings_cls, prog)
    for action in parser._actions:
        action.default = argparse.SUPPRESS  # a flag not given leaves no attribute
    named = vars(parser.parse_args(argv))
    return frozenset(f.path for f in flags(settings_cls) if f.dest in named)


def parse_settings(
    settings_cls: type,
    prog: str,
    argv: list[str] | None = None,
    resolve: Callable[[Any, frozenset[FieldPath]], Any] | None = None,
) -> Any:
    """The settings `argv` (None: the command line) gives; a bad flag or a setting the
    dataclasses refuse ends the process with one line and exit status 2. `resolve(settings,
    given)`, `given` the fields the command line named, returns the settings to use instead (its
    ValueError ends the process the same way)."""
    parser = build_parser(settings_cls, prog)
    args = parser.parse_args(argv)
    try:
        settings = from_args(settings_cls, args)
        if resolve is not None:
            settings = resolve(settings, given_paths(settings_cls, prog, argv))
        return settings
    except ValueError as e:
        parser.error(str(e))
