"""Shared fixtures and hooks: the tiny checkpoint, written once per test session (once per worker
under pytest-xdist), and the reliability tally's summary lines, gathered from every worker."""

from __future__ import annotations

from pathlib import Path

import pytest

from bagel.testing.tiny import write_tiny_checkpoint
from tests.helpers.tally import TALLY, Tally

TALLY_OUTPUT = "reliability_tally"

pytest_plugins = ["tests.helpers.mutation_order"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-bagel")
    write_tiny_checkpoint(directory, seed=0)
    return directory


def pytest_configure(config: pytest.Config) -> None:
    config.stash[TALLY] = Tally()


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)  # set on an xdist worker only
    if workeroutput is not None:
        workeroutput[TALLY_OUTPUT] = session.config.stash[TALLY].to_plain()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """xdist, on the controller: a worker finished; count its tally in."""
    plain = getattr(node, "workeroutput", {}).get(TALLY_OUTPUT)
    if plain is not None:
        node.config.stash[TALLY].add(plain)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    for line in config.stash[TALLY].lines():
        terminalreporter.write_line(line)
