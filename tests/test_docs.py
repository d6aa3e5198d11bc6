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
