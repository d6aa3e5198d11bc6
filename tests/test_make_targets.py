"""`make test` is the quick set and CI runs every test: `.ci/run` calls `make test-all`, whose
pytest run selects no subset of the suite, and `make test` leaves out the `slow` tests only."""

from __future__ import annotations

import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# pytest options that run less than the whole suite
SELECTING = ("-m", "-k", "--deselect", "--ignore", "--ignore-glob", "--lf", "--last-failed", "--sw")


def pytest_words(target: str) -> list[str]:
    """The words of the one pytest command `make TARGET` runs (a dry run: nothing executes)."""
    done = subprocess.run(
        ["make", "-n", "--always-make", target],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    (line,) = [line for line in done.stdout.splitlines() if " -m pytest" in line]
    words = shlex.split(line)
    return words[words.index("pytest") + 1 :]


def selection(words: list[str]) -> list[str]:
    """The selecting options among `words`, with their values, and any path given."""
    found = []
    for i, word in enumerate(words):
        if word.split("=")[0] in SELECTING:
            found += (
                words[i : i + 2] if "=" not in word and word not in ("--lf", "--sw") else [word]
            )
        elif not word.startswith("-") and words[i - 1] not in ("-n", "--dist", *SELECTING):
            found.append(word)
    return found


def test_ci_runs_make_test_all():
    commands = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert "make test-all" in commands
    assert "make test" not in commands


def test_make_test_all_runs_every_test():
    assert selection(pytest_words("test-all")) == []


def test_make_test_leaves_out_the_slow_tests_only():
    assert selection(pytest_words("test")) == ["-m", "not slow"]


def test_the_pytest_configuration_selects_nothing():
    config = (ROOT / "pyproject.toml").read_text()
    addopts = next(line for line in config.splitlines() if line.startswith("addopts"))
    assert selection(shlex.split(addopts.partition("=")[2].strip().strip('"'))) == []


@pytest.mark.parametrize(
    ("words", "selected"),
    [
        (["-q", "-n", "2", "-m", "not slow"], ["-m", "not slow"]),
        (["-q", "-k", "grpc"], ["-k", "grpc"]),
        (["--deselect=tests/x.py::t"], ["--deselect=tests/x.py::t"]),
        (["-x", "tests/transport"], ["tests/transport"]),
        (["--lf"], ["--lf"]),
    ],
)
def test_a_selecting_option_is_seen(words: list[str], selected: list[str]):
    assert selection(words) == selected


def test_every_test_the_mutation_run_names_exists():
    """`[tool.mutmut]`'s test selection and deselections name files and tests of today's suite:
    a renamed test would otherwise be run by every mutant it was left out for."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    for path in config["source_paths"]:
        assert (ROOT / path).exists(), path
    stale = []
    for word in config["pytest_add_cli_args_test_selection"]:
        if not word.startswith("tests/"):
            continue
        path, _, name = word.partition("::")
        if not (ROOT / path).exists() or (name and f"def {name}(" not in (ROOT / path).read_text()):
            stale.append(word)
    assert not stale, f"[tool.mutmut] names tests that are not in the suite: {stale}"
