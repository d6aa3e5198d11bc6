"""Under `make mutation`: each mutant's tests run fastest first, by the durations mutmut measured
(`mutants/mutmut-stats.json`). mutmut stops a mutant at its first failing test but hands pytest
the tests in no set order, so a killed mutant could run its slowest tests before the one that
kills it. Outside mutmut's directory the suite's order is unchanged."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

STATS_FILE = Path("mutmut-stats.json")  # mutmut runs the tests in `mutants/`

_durations: dict[str, float] = {}


def recorded_durations() -> dict[str, float]:
    """Seconds per test id, read once it exists: mutmut's fork server collects the tests after
    its timing run, so every mutant's process inherits what the server read."""
    if not _durations and STATS_FILE.exists():
        _durations.update(json.loads(STATS_FILE.read_text())["duration_by_test"])
    return _durations


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    durations = recorded_durations()
    if durations and os.environ.get("MUTANT_UNDER_TEST"):
        items.sort(key=lambda item: durations.get(item.nodeid, 0.0))
