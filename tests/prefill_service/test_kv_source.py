"""The `KVSource` protocols say what the servicer calls: every implementation's methods take the
protocol's parameters, by the same names, in the same order (a Protocol is not checked by
`isinstance` beyond the method's presence)."""

from __future__ import annotations

import inspect

import pytest

from prefill_service.mock import SyntheticKV
from prefill_service.prefill import EditKVSource, KVSource, LanguageModelKV

CASES = [
    (KVSource, "plan", LanguageModelKV),
    (KVSource, "plan", SyntheticKV),
    (EditKVSource, "plan_edit", LanguageModelKV),
    (EditKVSource, "edit_size", LanguageModelKV),
]


def parameters(method) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(method).parameters.values()]


@pytest.mark.parametrize(
    ("protocol", "name", "implementation"),
    CASES,
    ids=[f"{impl.__name__}.{name}" for _, name, impl in CASES],
)
def test_an_implementation_takes_the_protocols_parameters(protocol, name, implementation):
    assert parameters(getattr(implementation, name)) == parameters(getattr(protocol, name))


def test_the_protocol_takes_a_think_plan():
    assert "think_plan" in dict(parameters(KVSource.plan))
    assert "think_plan" in dict(parameters(EditKVSource.plan_edit))


def test_the_protocols_name_the_attributes_the_servicer_reads():
    assert {"config", "dtype"} <= set(KVSource.__annotations__)
    assert isinstance(EditKVSource.__dict__["supports_edits"], property)
    assert isinstance(LanguageModelKV.supports_edits, property)
