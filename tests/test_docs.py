"""The docs state what is true now: no diary words in README.md or docs/*.md. A page that says
"this round", "not landed" or cites a "DESIGN" document (not in the repository) reads as a
report of the day it was written; git keeps the history, and a date belongs only beside a
measurement."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])

DIARY = [
    re.compile(r"\b(this|next|last|previous|earlier|later|coming) round\b", re.I),
    re.compile(r"\b(has|have|had|is|are)( not|n't)( yet)? (landed|merged)\b", re.I),
    re.compile(r"\bnot (yet )?landed\b", re.I),
    re.compile(r"\b(yet to|will|once it|once they|when it|when they) (land|lands|merge)\b", re.I),
    re.compile(r"\bDESIGN(\.md|'s)?\b"),  # a planning document that is not in the repository
    re.compile(r"\b(TODO|FIXME|XXX)\b"),
    re.compile(r"\bthis (PR|pull request|branch|sprint|week)\b", re.I),
]


def diary_words(text: str) -> list[tuple[int, str]]:
    """(line number, the words) of every diary phrase in `text`."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for pattern in DIARY:
            found += [(number, m.group(0)) for m in pattern.finditer(line)]
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_page_has_no_diary_words(page: Path):
    assert diary_words(page.read_text()) == []


@pytest.mark.parametrize(
    "text",
    [
        "What changed this round:",
        "FP8 linear layers have not landed.",
        "not landed yet",
        "Every row is above DESIGN's target.",
        "see DESIGN.md",
        "the gateway will land next",
        "TODO: measure",
        "In this PR the decode",
    ],
)
def test_the_check_finds_each_kind_of_diary_phrase(text: str):
    assert diary_words(text)


@pytest.mark.parametrize(
    "text",
    [
        "rounds to the nearest even",
        "a design choice",
        "the landed weights",
        "a round trip",
        "Date: 2026-11-30",
    ],
)
def test_ordinary_words_pass(text: str):
    assert diary_words(text) == []


REAL_MODEL = ROOT / "docs" / "real_model.md"


def test_the_real_model_page_names_the_model_and_how_to_download_it():
    text = REAL_MODEL.read_text()
    assert "ByteDance-Seed/BAGEL-7B-MoT" in text
    assert re.search(r"^\.venv/bin/hf download ByteDance-Seed/BAGEL-7B-MoT ", text, re.M)
    assert "python -m bagel.checkpoints.check_checkpoint models/BAGEL-7B-MoT" in text


def test_the_real_model_page_lists_the_files_the_checker_requires():
    from bagel.checkpoints.check_checkpoint import LLM_CONFIG_FILE, TOKENIZER_FILES
    from bagel.checkpoints.checkpoint import EMA_FILE
    from bagel.checkpoints.model_info import MODEL_INFO_FILE
    from bagel.network.config import AE_FILE
    from bagel.network.vit import VIT_CONFIG_FILE

    single, pair = TOKENIZER_FILES
    files = [LLM_CONFIG_FILE, VIT_CONFIG_FILE, EMA_FILE, AE_FILE, single, *pair, MODEL_INFO_FILE]
    table = REAL_MODEL.read_text().split("## The files we read", 1)[1].split("##", 1)[0]
    for name in files:
        assert f"`{name}`" in table, name


def test_the_real_model_memory_figures_are_the_benchmarks():
    """Each reserved / allocated pair and each time in the memory table is one that
    docs/benchmarks.md reports (the one source of the figures)."""
    benchmarks = (ROOT / "docs" / "benchmarks.md").read_text()
    section = REAL_MODEL.read_text().split("## Memory per GPU", 1)[1].split("\n- ", 1)[0]
    table = "\n".join(line for line in section.splitlines() if line.startswith("| "))
    pairs = re.findall(r"\d+\.\d / \d+\.\d", table)
    assert len(pairs) == 6
    for pair in pairs:
        assert pair in benchmarks, pair
    totals = re.findall(r"\| (\d{4}) \|$", table, re.M)
    assert len(totals) == 4
    for ms in totals:
        assert ms in benchmarks, ms


PRODUCT_PACKAGES = [
    "bagel",
    "serving",
    "step_cache",
    "transport",
    "diffusion_service",
    "prefill_service",
    "client",
    "gateway",
]
# A date, or a card or machine a figure was measured on: such figures live in docs/benchmarks.md
# with their command, card and date; code comments say what the code does and why.
MEASUREMENT = [
    re.compile(r"\b20\d\d-\d\d-\d\d\b"),
    re.compile(r"\bmeasured (on|at|with)\b", re.I),
    re.compile(r"\bon (an? |the )?(H100|H200|A100|CI VM|CI machine)\b", re.I),
]


def dated_measurements(text: str) -> list[tuple[int, str]]:
    """(line number, the words) of every dated or card-bound measurement in `text`."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for pattern in MEASUREMENT:
            found += [(number, m.group(0)) for m in pattern.finditer(line)]
    return found


def test_product_code_carries_no_dated_measurements():
    found = {
        str(path.relative_to(ROOT)): hits
        for package in PRODUCT_PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if (hits := dated_measurements(path.read_text()))
    }
    assert found == {}, f"move these figures to docs/benchmarks.md: {found}"


@pytest.mark.parametrize(
    "text",
    [
        "# measured on an H200 at K = 18944",
        "attention took 31.1 ms (2026-11-30)",
        "halved throughput on the CI VM",
    ],
)
def test_the_measurement_check_finds_each_kind(text: str):
    assert dated_measurements(text)


ARCHITECTURE = ROOT / "docs" / "architecture.md"
# The folders whose one job the map states: every product package and every subpackage of the
# two packages that are grouped by role.
MAPPED = (
    "protos", "serving", "transport", "bagel", "step_cache", "prefill_service",
    "diffusion_service", "gateway", "client", "benchmarks", "examples", "tests",
)  # fmt: skip


def _packages_to_map() -> set[str]:
    found = {f"{name}/" for name in MAPPED}
    for parent in ("bagel", "serving", "diffusion_service"):
        found |= {
            f"{parent}/{p.parent.name}/"
            for p in (ROOT / parent).glob("*/__init__.py")
            if p.parent.name != "__pycache__"
        }
    return found


def test_the_architecture_map_gives_every_package_its_job():
    rows = re.findall(r"^\| `([^`]+)` \| (.+) \|$", ARCHITECTURE.read_text(), re.M)
    jobs = {path: job for path, job in rows}
    missing = sorted(_packages_to_map() - set(jobs))
    assert not missing, f"docs/architecture.md has no row for {missing}"
    stale = sorted(p for p in jobs if not (ROOT / p).exists())
    assert not stale, f"docs/architecture.md names what is not in the tree: {stale}"


def test_the_readme_sends_readers_to_the_architecture_map_first():
    assert "docs/architecture.md" in (ROOT / "README.md").read_text()
