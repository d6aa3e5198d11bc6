"""Installs are reproducible: constraints.txt pins every dependency the project declares (torch
aside: TORCH_SPEC picks its build) to a version pyproject.toml allows, the runtime dependencies
have upper bounds, the Makefile and the Dockerfile install with the constraints, and each console
script names the function `python -m` runs."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
RUNTIME = [Requirement(r) for r in PROJECT["dependencies"]]
EXTRAS = [Requirement(r) for extra in PROJECT["optional-dependencies"].values() for r in extra]
TORCH = "torch"


def pins() -> dict[str, Version]:
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        assert match, f"constraints.txt: {line!r} is not NAME==VERSION"
        found[canonicalize_name(match.group(1))] = Version(match.group(2))
    return found


# torch comes from TORCH_SPEC (a CPU or a CUDA build), not from the constraints.
@pytest.mark.parametrize("requirement", [r for r in RUNTIME + EXTRAS if r.name != TORCH], ids=str)
def test_every_declared_dependency_is_pinned_within_its_bounds(requirement: Requirement):
    pinned = pins().get(canonicalize_name(requirement.name))
    assert pinned is not None, f"{requirement.name} is not pinned in constraints.txt"
    assert requirement.specifier.contains(pinned, prereleases=True), (
        f"constraints.txt pins {requirement.name}=={pinned}, outside pyproject.toml's "
        f"{requirement.specifier}"
    )


def test_torch_and_the_project_itself_are_not_pinned():
    assert TORCH not in pins()
    assert canonicalize_name(PROJECT["name"]) not in pins()


@pytest.mark.parametrize("requirement", RUNTIME, ids=str)
def test_every_runtime_dependency_stops_before_its_next_major_version(requirement: Requirement):
    uppers = [s for s in requirement.specifier if s.operator in ("<", "<=", "~=", "==")]
    assert uppers, f"{requirement} has no upper bound"


def test_the_makefile_and_the_dockerfile_install_with_the_constraints():
    makefile = (ROOT / "Makefile").read_text()
    installs = [line for line in makefile.splitlines() if "pip install" in line and "-e" in line]
    assert installs and all("-c constraints.txt" in line for line in installs)
    assert '-c constraints.txt "$(TORCH_SPEC)"' in makefile
    assert "TORCH_SPEC ?= torch==2.13.0" in makefile
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY constraints.txt /tmp/constraints.txt" in dockerfile
    assert "pip install -c /tmp/constraints.txt -r /tmp/requirements.txt" in dockerfile
    assert "!constraints.txt" in (ROOT / ".dockerignore").read_text().splitlines()


@pytest.mark.parametrize(
    ("script", "module"),
    [
        ("bagel-diffusion", "diffusion_service"),
        ("bagel-prefill", "prefill_service"),
        ("bagel", "client"),
    ],
)
def test_each_console_script_runs_what_python_m_runs(script: str, module: str):
    target = PROJECT["scripts"][script]
    module_name, _, function = target.partition(":")
    main = getattr(importlib.import_module(module_name), function)
    assert callable(main)
    main_py = (ROOT / module / "__main__.py").read_text()
    # `python -m MODULE` calls the same function: defined in __main__ or imported into it.
    assert f"def {function}(" in main_py or f"from {module_name} import {function}" in main_py
    done = subprocess.run(
        [sys.executable, "-c", f"import sys; from {module_name} import {function}; "
         f"sys.exit({function}())", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.startswith("usage: "), done.stderr
