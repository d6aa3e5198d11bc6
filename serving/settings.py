"""Shared command-line plumbing of both services: defaults come from the settings dataclass, so
each is written once."""

from __future__ import annotations

import dataclasses
from typing import Any

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
