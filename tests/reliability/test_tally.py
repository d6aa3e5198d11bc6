"""The summary lines survive pytest-xdist: tallies kept by separate workers, handed over as plain
data and added up, print what one tally of every test would."""

from __future__ import annotations

from tests.helpers.tally import LoadFigures, Tally

LOAD = LoadFigures(16, 60.0, 428, 0, 0, 16, {"prefill": (408.0, 406.0)})


def fill(tally: Tally, part: int) -> None:
    """Half of the suite's reports: `part` 0 or 1."""
    with tally.hostile_input():
        pass
    with tally.fault(f"fault {part}"):
        pass
    with tally.security(f"security {part}"):
        pass
    with tally.cache_layout(f"layout {part}"):
        pass
    if part == 1:
        tally.load = LOAD


def test_tallies_of_two_workers_add_up_to_the_tally_of_one_run():
    one_run = Tally()
    fill(one_run, 0)
    fill(one_run, 1)
    controller, first, second = Tally(), Tally(), Tally()
    fill(first, 0)
    fill(second, 1)
    controller.add(first.to_plain())
    controller.add(second.to_plain())
    assert controller.lines() == one_run.lines()
    assert len(controller.lines()) == 5
    assert "hostile inputs 2 tried, 2 passed" in controller.lines()[1]
