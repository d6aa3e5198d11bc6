"""`make mutation` runs each mutant's tests fastest first; every other run keeps pytest's order."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from tests.helpers import mutation_order

DURATIONS = {"tests/a.py::slow": 3.0, "tests/a.py::fast": 0.1, "tests/b.py::middle": 1.0}


@pytest.fixture
def in_mutants_dir(tmp_path, monkeypatch):
    (tmp_path / "mutmut-stats.json").write_text(json.dumps({"duration_by_test": DURATIONS}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mutation_order, "_durations", {})


def items(*ids: str) -> list[SimpleNamespace]:
    return [SimpleNamespace(nodeid=i) for i in ids]


def order(*ids: str) -> list[str]:
    collected = items(*ids)
    mutation_order.pytest_collection_modifyitems(collected)
    return [i.nodeid for i in collected]


def test_a_mutants_tests_run_fastest_first(in_mutants_dir, monkeypatch):
    monkeypatch.setenv("MUTANT_UNDER_TEST", "transport.wire.x__fields__mutmut_1")
    assert order(
        "tests/a.py::slow", "tests/b.py::middle", "tests/new.py::unmeasured", "tests/a.py::fast"
    ) == ["tests/new.py::unmeasured", "tests/a.py::fast", "tests/b.py::middle", "tests/a.py::slow"]


def test_the_fork_servers_collection_keeps_the_order_and_reads_the_durations(
    in_mutants_dir, monkeypatch
):
    monkeypatch.delenv("MUTANT_UNDER_TEST", raising=False)
    assert order("tests/a.py::slow", "tests/a.py::fast") == ["tests/a.py::slow", "tests/a.py::fast"]
    assert mutation_order._durations == DURATIONS


def test_without_mutmuts_timings_the_order_is_pytests(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mutation_order, "_durations", {})
    monkeypatch.setenv("MUTANT_UNDER_TEST", "transport.wire.x__fields__mutmut_1")
    assert order("tests/a.py::slow", "tests/a.py::fast") == ["tests/a.py::slow", "tests/a.py::fast"]
