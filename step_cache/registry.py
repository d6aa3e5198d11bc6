"""The step-cache policies by name: `POLICIES` maps each member of the proto oneof
`bagel.v1.CacheConfig.policy` to its config class, in wire order. Every module of
`step_cache/policies/` registers its policy on import; the request codec, the CLI's help and the
tests read this mapping, so a new policy is one module plus its proto message."""

from __future__ import annotations

from step_cache.policy import PolicyConfig

POLICIES: dict[str, type[PolicyConfig]] = {}


def register(cls: type[PolicyConfig]) -> type[PolicyConfig]:
    """Add `cls` under its `name` (a class decorator); ValueError if the name or the wire number
    is taken by another class."""
    for other in POLICIES.values():
        if other is not cls and (other.name == cls.name or other.wire_number == cls.wire_number):
            raise ValueError(
                f"cache policy {cls.__name__} ({cls.name}, field {cls.wire_number}) clashes "
                f"with {other.__name__} ({other.name}, field {other.wire_number})"
            )
    ordered = sorted({**POLICIES, cls.name: cls}.items(), key=lambda item: item[1].wire_number)
    POLICIES.clear()
    POLICIES.update(ordered)
    return cls


def unregister(cls: type[PolicyConfig]) -> None:
    """Remove `cls` (tests that add a policy of their own)."""
    if POLICIES.get(cls.name) is cls:
        del POLICIES[cls.name]


def _load_policies() -> None:
    import importlib
    import pkgutil

    from step_cache import policies

    for module in pkgutil.iter_modules(policies.__path__):
        importlib.import_module(f"{policies.__name__}.{module.name}")


_load_policies()
