"""Every benchmark answers `--help`, both as `python -m benchmarks.NAME` and as
`python benchmarks/NAME.py`, from the repo root, without CUDA; and no benchmark module takes the
name of one of the repo's packages (run as a script, it would shadow that package).

The quick check runs every benchmark of a form in one process (`help_in_one_process.py`: torch
imported once, the repo's modules afresh for each); the `slow` one starts a process for each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = sorted(
    p.stem for p in (ROOT / "benchmarks").glob("*.py") if not p.stem.startswith("_")
)
FORMS = {
    "module": lambda name: ["-m", f"benchmarks.{name}"],
    "script": lambda name: [f"benchmarks/{name}.py"],
}


# No GPU, and no PYTHONPATH: the script form must find the repo's packages by itself.
ENV = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "CUDA_VISIBLE_DEVICES": ""}


@dataclass(frozen=True)
class HelpRun:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def help_runs_in_one_process() -> dict[tuple[str, str], HelpRun]:
    """Every (benchmark, form) `--help` run, one process per form."""

    def run(form: str) -> dict[str, list]:
        done = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("help_in_one_process.py")), form,
             *BENCHMARKS],
            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        return json.loads(done.stdout)

    with ThreadPoolExecutor(max_workers=len(FORMS)) as pool:
        by_form = dict(zip(FORMS, pool.map(run, FORMS), strict=True))
    return {
        (name, form): HelpRun(*runs[name]) for form, runs in by_form.items() for name in BENCHMARKS
    }


@pytest.fixture(scope="module")
def help_runs() -> dict[tuple[str, str], subprocess.CompletedProcess]:
    """Every (benchmark, form) `--help` run in a process of its own, started together: each pays
    torch's import."""
    cases = [(name, form) for name in BENCHMARKS for form in FORMS]

    def run(case: tuple[str, str]) -> subprocess.CompletedProcess:
        name, form = case
        return subprocess.run(
            [sys.executable, *FORMS[form](name), "--help"],
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return dict(zip(cases, pool.map(run, cases), strict=True))


def test_benchmarks_are_found():
    assert "kv_transport" in BENCHMARKS and "sp_gpu" in BENCHMARKS


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("name", BENCHMARKS)
def test_help_exits_0_and_prints_usage(help_runs_in_one_process, name, form):
    result = help_runs_in_one_process[name, form]
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage:"), result.stdout[:500]


@pytest.mark.slow
@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("name", BENCHMARKS)
def test_help_exits_0_and_prints_usage_in_a_process_of_its_own(help_runs, name, form):
    result = help_runs[name, form]
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage:"), result.stdout[:500]


def test_no_benchmark_module_is_named_like_a_package():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert {
        "bagel",
        "protos",
        "serving",
        "transport",
        "diffusion_service",
        "prefill_service",
    } <= packages
    modules = {p.stem for p in (ROOT / "benchmarks").rglob("*.py")}
    assert not modules & packages, f"benchmarks/ shadows packages {sorted(modules & packages)}"
