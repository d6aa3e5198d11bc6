"""How one request field travels: between the dataclass and its protobuf field, from a caller's
keyword argument, from the command line, and what values it may hold.

`serving.params` attaches one codec to every field; nothing else names the fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from serving.errors import InvalidParams


def enum_names(enum: EnumTypeWrapper, prefix: str) -> tuple[str, ...]:
    """The lower-case names of a proto enum's values after its prefix, UNSPECIFIED left out."""
    return tuple(
        name.removeprefix(prefix).lower()
        for name in enum.keys()  # noqa: SIM118 - an enum wrapper, not a dict
        if not name.endswith("_UNSPECIFIED")
    )


def fields_from_message(cls: type, msg: Any) -> dict[str, Any]:
    """Dataclass keyword arguments for the fields `msg` sets (unset ones are left out)."""
    values = {}
    for f in dataclasses.fields(cls):
        value = f.metadata["codec"].from_proto(msg, f.name)
        if value is not None:
            values[f.name] = value
    return values


def fields_to_message(obj: Any, msg: Any) -> Any:
    """Set every field of dataclass `obj` on `msg`; returns `msg`."""
    for f in dataclasses.fields(obj):
        f.metadata["codec"].to_proto(msg, f.name, getattr(obj, f.name))
    return msg


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def spec(
    codec: Codec,
    help: str,
    *,
    flags: tuple[str, ...] = (),
    bounds: Range | None = None,
    key: str | None = None,
    zero_means_unlimited: bool = False,
    modifier: str | None = None,
    when_named: Any = None,
) -> dict:
    """Field metadata: how the field travels, what `--help` says, extra CLI flag spellings, the
    valid range (None: the codec's own checks, or checked in `validate`). For cache-policy
    fields: their short key in a `--cache` spec, whether -1 there stands for 0 (no limit), and
    for a field set by a `+MODIFIER[:KEY=VALUE]` suffix rather than among the policy's options,
    the modifier's name and the value the field takes when the modifier is named alone."""
    return {
        "codec": codec,
        "help": help,
        "flags": flags,
        "bounds": bounds,
        "key": key,
        "zero_means_unlimited": zero_means_unlimited,
        "modifier": modifier,
        "when_named": when_named,
    }


@dataclass(frozen=True)
class Range:
    """Valid values `lo .. hi`; an open end excludes its bound."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, value: float) -> bool:
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def check(self, name: str, value: float) -> None:
        if not self.contains(value):
            raise InvalidParams(f"{name}={value!r} must be in {self}")

    def __str__(self) -> str:
        lo, hi = _number(self.lo), _number(self.hi)
        return f"{'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"


def _number(value: float) -> str:
    """An integer bound exactly (a seed's 2**63 - 1, not 9.22337e+18), a float one short."""
    return str(value) if isinstance(value, int) else f"{value:g}"


class Codec:
    """Scalar fields with proto3 `optional` presence: unset on the wire means the default."""

    python_type: type = object

    def from_proto(self, msg: Any, name: str) -> Any:
        return getattr(msg, name) if msg.HasField(name) else None

    def to_proto(self, msg: Any, name: str, value: Any) -> None:
        setattr(msg, name, value)

    def from_user(self, name: str, value: Any) -> Any:
        """A caller's keyword argument as the field holds it; TypeError for a wrong type."""
        self._check_type(name, value, TypeError)
        return value

    def check(self, name: str, value: Any) -> None:
        """InvalidParams unless the field may hold `value` at all (ranges come separately)."""
        self._check_type(name, value, InvalidParams)

    def _check_type(self, name: str, value: Any, error: type[Exception]) -> None:
        if isinstance(value, bool) or not isinstance(value, self.python_type):
            raise error(f"{name} must be {self.python_type.__name__}, got {value!r}")

    def add_argument(self, parser: argparse.ArgumentParser, name: str, meta: dict) -> None:
        parser.add_argument(
            flag(name), *meta["flags"], dest=name, type=self.python_type, help=meta["help"]
        )

    def from_cli(self, args: argparse.Namespace, name: str) -> Any:
        return getattr(args, name)

    def json_type(self) -> Any:
        """The type a JSON (or form) body carries the field as, for HTTP request schemas."""
        return self.python_type


class IntCodec(Codec):
    python_type = int


class FloatCodec(Codec):
    python_type = float

    def from_user(self, name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name} must be a number, got {value!r}")
        return float(value)

    def check(self, name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidParams(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise InvalidParams(f"{name}={value!r} must be finite")


class BoolCodec(Codec):
    """A proto3 `optional bool`; on the command line `--name` / `--no-name`."""

    python_type = bool

    def _check_type(self, name: str, value: Any, error: type[Exception]) -> None:
        if not isinstance(value, bool):
            raise error(f"{name} must be bool, got {value!r}")

    def add_argument(self, parser: argparse.ArgumentParser, name: str, meta: dict) -> None:
        parser.add_argument(
            flag(name),
            *meta["flags"],
            dest=name,
            action=argparse.BooleanOptionalAction,
            default=None,
            help=meta["help"],
        )


class StringCodec(Codec):
    """A proto3 string without presence: empty means unset."""

    python_type = str

    def __init__(self, max_chars: int) -> None:
        self.max_chars = max_chars

    def from_proto(self, msg: Any, name: str) -> str | None:
        return getattr(msg, name) or None

    def check(self, name: str, value: Any) -> None:
        super().check(name, value)
        if len(value) > self.max_chars:
            raise InvalidParams(f"{name} is longer than {self.max_chars} characters")


class EnumNameCodec(Codec):
    """A proto enum, held as the lower-case name of its value (`CFG_RENORM_TYPE_GLOBAL` ->
    "global"); the zero value (UNSPECIFIED) means unset."""

    python_type = str

    def __init__(self, enum: EnumTypeWrapper, prefix: str) -> None:
        self.enum = enum
        self.prefix = prefix
        self.names = enum_names(enum, prefix)

    def from_proto(self, msg: Any, name: str) -> str | None:
        number = getattr(msg, name)
        if number == 0:
            return None
        label = self.enum.Name(number) if number in self.enum.values() else None
        if label is None:
            raise InvalidParams(f"{name}={number} is not a known value")
        return label.removeprefix(self.prefix).lower()

    def to_proto(self, msg: Any, name: str, value: str) -> None:
        setattr(msg, name, self.enum.Value(self.prefix + value.upper()))

    def from_user(self, name: str, value: Any) -> str:
        super().from_user(name, value)
        if value not in self.names:
            raise ValueError(f"{name} must be one of {', '.join(self.names)}, got {value!r}")
        return value

    def check(self, name: str, value: Any) -> None:
        super().check(name, value)
        if value not in self.names:
            raise InvalidParams(f"{name}={value!r} must be one of {', '.join(self.names)}")

    def add_argument(self, parser: argparse.ArgumentParser, name: str, meta: dict) -> None:
        parser.add_argument(
            flag(name), *meta["flags"], dest=name, choices=self.names, help=meta["help"]
        )

    def json_type(self) -> Any:
        return Literal[self.names]


class IntervalCodec(Codec):
    """A `(lo, hi)` pair of floats in [0, 1], as a message with fields `lo` and `hi`."""

    def from_proto(self, msg: Any, name: str) -> tuple[float, float] | None:
        if not msg.HasField(name):
            return None
        pair = getattr(msg, name)
        return (pair.lo, pair.hi)

    def to_proto(self, msg: Any, name: str, value: tuple[float, float]) -> None:
        pair = getattr(msg, name)
        pair.lo, pair.hi = value

    def from_user(self, name: str, value: Any) -> tuple[float, float]:
        if not isinstance(value, tuple | list) or len(value) != 2:
            raise TypeError(f"{name} must be a pair (lo, hi), got {value!r}")
        return tuple(FloatCodec().from_user(name, x) for x in value)  # type: ignore[return-value]

    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, tuple) or len(value) != 2:
            raise InvalidParams(f"{name} must be a pair (lo, hi), got {value!r}")
        for x in value:
            FloatCodec().check(name, x)
            if not 0.0 <= x <= 1.0:
                raise InvalidParams(f"{name}={value!r}: both ends must be in [0, 1]")

    def add_argument(self, parser: argparse.ArgumentParser, name: str, meta: dict) -> None:
        parser.add_argument(
            flag(name),
            *meta["flags"],
            dest=name,
            type=float,
            nargs=2,
            metavar=("LO", "HI"),
            help=meta["help"],
        )

    def from_cli(self, args: argparse.Namespace, name: str) -> tuple[float, float] | None:
        value = getattr(args, name)
        return tuple(value) if value is not None else None  # type: ignore[return-value]

    def json_type(self) -> Any:
        return tuple[float, float]


class CachePolicyCodec(Codec):
    """A oneof of policy messages, held as one of the policy dataclasses. `policies` maps each
    oneof member's name to its dataclass, whose fields are the member message's fields; it is
    read at each use, so a policy registered later is known."""

    def __init__(self, policies: dict[str, type]) -> None:
        self.policies = policies

    @property
    def names(self) -> dict[type, str]:
        return {cls: name for name, cls in self.policies.items()}

    def from_proto(self, msg: Any, name: str) -> Any:
        if not msg.HasField(name):
            return None
        holder = getattr(msg, name)
        member = holder.WhichOneof("policy")
        if member is None:
            return None
        cls = self.policies.get(member)
        if cls is None:
            raise InvalidParams(f"{name}.{member} is not a known policy")
        return cls(**fields_from_message(cls, getattr(holder, member)))

    def to_proto(self, msg: Any, name: str, value: Any) -> None:
        if value is None:  # unset: the receiver's default
            return
        member = getattr(getattr(msg, name), self.names[type(value)])
        member.SetInParent()
        fields_to_message(value, member)

    def from_user(self, name: str, value: Any) -> Any:
        """A policy dataclass, or a spec string (see `parse`)."""
        if isinstance(value, str):
            return self.parse(value)
        if type(value) not in self.names:
            raise TypeError(
                f"{name} must be a spec string or one of "
                f"{', '.join(cls.__name__ for cls in self.names)}, got {value!r}"
            )
        return value

    def check(self, name: str, value: Any) -> None:
        if value is not None and type(value) not in self.names:
            raise InvalidParams(f"{name}={value!r} is not a known policy")

    def parse(self, text: str) -> Any:
        """`NAME[:KEY=VALUE,...][+MODIFIER[:KEY=VALUE,...]]`, e.g. `none`,
        `teacache:threshold=0.2`, `dbcache:fn=4,bn=0,warmup=8,max_cached=-1,threshold=0.24+
        taylorseer:order=2`. NAME is a policy's name with or without underscores; KEY a field's
        short key or its name; -1 means no limit where 0 does; a MODIFIER (`taylorseer`) sets the
        fields its policy takes under that name. Raises ValueError naming what is wrong."""
        head, *modifiers = text.strip().split("+")
        policy_name, _, options = head.partition(":")
        cls = self._lookup(policy_name.strip())
        values = self._options(cls, options, text)
        for modifier in modifiers:
            mod_name, _, mod_options = modifier.partition(":")
            mod_name = mod_name.strip()
            if mod_name not in self.modifier_names():
                raise ValueError(f"cache spec {text!r}: unknown modifier {mod_name!r}")
            fields = [f for f in dataclasses.fields(cls) if f.metadata.get("modifier") == mod_name]
            if not fields:
                raise ValueError(f"cache spec {text!r}: {policy_name} takes no {mod_name}")
            by_key = {f.metadata["key"]: f for f in fields}
            for key, raw in self._pairs(mod_options, text):
                if key not in by_key:
                    known = ", ".join(f"{k}=N" for k in by_key)
                    raise ValueError(f"cache spec {text!r}: {mod_name} takes only {known}")
                f = by_key[key]
                values[f.name] = self._number(f.metadata["codec"].python_type, key, raw, text)
            for f in fields:
                values.setdefault(f.name, f.metadata["when_named"])
        return cls(**values)

    def spec_names(self) -> str:
        return ", ".join(name.replace("_", "") for name in self.policies)

    def modifier_names(self) -> dict[str, str]:
        """The `+MODIFIER`s some policy takes -> their options (`order=N`), in the order met."""
        found: dict[str, list[str]] = {}
        for cls in self.policies.values():
            for f in dataclasses.fields(cls):
                if f.metadata.get("modifier"):
                    keys = found.setdefault(f.metadata["modifier"], [])
                    if f.metadata["key"] not in keys:
                        keys.append(f.metadata["key"])
        return {m: ",".join(f"{k}=N" for k in keys) for m, keys in found.items()}

    def _lookup(self, name: str) -> type:
        for member, cls in self.policies.items():
            if name in (member, member.replace("_", "")):
                return cls
        raise ValueError(f"unknown cache policy {name!r}; known: {self.spec_names()}")

    def _options(self, cls: type, options: str, text: str) -> dict[str, Any]:
        own = [f for f in dataclasses.fields(cls) if not f.metadata.get("modifier")]
        by_key = {}
        for f in own:
            by_key[f.name] = f
            if f.metadata.get("key"):
                by_key[f.metadata["key"]] = f
        values: dict[str, Any] = {}
        for key, raw in self._pairs(options, text):
            f = by_key.get(key)
            if f is None:
                known = ", ".join(f.metadata.get("key") or f.name for f in own)
                raise ValueError(f"cache spec {text!r}: unknown option {key!r}; known: {known}")
            value = self._number(f.metadata["codec"].python_type, key, raw, text)
            if value == -1 and f.metadata.get("zero_means_unlimited"):
                value = 0
            values[f.name] = value
        return values

    @staticmethod
    def _pairs(options: str, text: str) -> list[tuple[str, str]]:
        pairs = []
        for item in filter(None, (part.strip() for part in options.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"cache spec {text!r}: {item!r} is not KEY=VALUE")
            pairs.append((key.strip(), value.strip()))
        return pairs

    @staticmethod
    def _number(kind: type, key: str, raw: str, text: str) -> Any:
        try:
            return kind(raw)
        except ValueError:
            raise ValueError(f"cache spec {text!r}: {key}={raw!r} is not {kind.__name__}") from None

    def add_argument(self, parser: argparse.ArgumentParser, name: str, meta: dict) -> None:
        modifiers = "".join(f"[+{m}:{keys}]" for m, keys in self.modifier_names().items())
        parser.add_argument(
            flag(name),
            *meta["flags"],
            dest=name,
            metavar="SPEC",
            help=f"{meta['help']}: NAME[:KEY=VALUE,...]{modifiers}, NAME one of "
            f"{self.spec_names()} (e.g. dbcache:fn=4,bn=0,warmup=8,threshold=0.24)",
        )

    def from_cli(self, args: argparse.Namespace, name: str) -> Any:
        text = getattr(args, name)
        return None if text is None else self.parse(text)

    def display_name(self, value: Any) -> str:
        """The policy's name as a spec starts (`none`, `teacache`, `dbcache`), with
        `+MODIFIER` for each modifier whose fields are set (`dbcache+taylorseer`)."""
        if value is None:
            return "none"
        mods = dict.fromkeys(
            f.metadata["modifier"]
            for f in dataclasses.fields(value)
            if f.metadata.get("modifier") and getattr(value, f.name)
        )
        return self.names[type(value)].replace("_", "") + "".join(f"+{m}" for m in mods)

    def json_type(self) -> Any:
        return str  # a spec, as --cache takes it
