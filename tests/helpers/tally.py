"""The reliability tally: what the suite tried and what held, per category, printed as one summary
line per category at the end of the run. Under pytest-xdist each worker keeps its own tally and
hands it to the controller as plain JSON when it finishes (tests/conftest.py merges and prints)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest


@dataclass
class LoadFigures:
    clients: int
    seconds: float
    served: int
    lost: int
    resource_exhausted: int
    max_queue: int
    rss_mb: dict[str, tuple[float, float]]  # process group -> (mean of first 10 s, of last 10 s)


@dataclass
class Tally:
    """What the suite tried and what held, per category."""

    hostile_tried: int = 0
    hostile_passed: int = 0
    faults_tried: list[str] = field(default_factory=list)
    faults_survived: list[str] = field(default_factory=list)
    security_tried: list[str] = field(default_factory=list)
    security_held: list[str] = field(default_factory=list)
    load: LoadFigures | None = None
    cache_layouts_tried: list[str] = field(default_factory=list)
    cache_layouts_agreed: list[str] = field(default_factory=list)

    @contextmanager
    def hostile_input(self) -> Iterator[None]:
        self.hostile_tried += 1
        yield
        self.hostile_passed += 1

    @contextmanager
    def fault(self, name: str) -> Iterator[None]:
        self.faults_tried.append(name)
        yield
        self.faults_survived.append(name)

    @contextmanager
    def cache_layout(self, name: str) -> Iterator[None]:
        self.cache_layouts_tried.append(name)
        yield
        self.cache_layouts_agreed.append(name)

    @contextmanager
    def security(self, name: str) -> Iterator[None]:
        self.security_tried.append(name)
        yield
        self.security_held.append(name)

    def lines(self) -> list[str]:
        lines = []
        if self.cache_layouts_tried:
            lines.append(
                f"reliability: step-cache decisions {len(self.cache_layouts_agreed)} of "
                f"{len(self.cache_layouts_tried)} layouts as one process "
                f"({', '.join(self.cache_layouts_tried)})"
            )
        if self.hostile_tried:
            lines.append(
                f"reliability: hostile inputs {self.hostile_tried} tried, {self.hostile_passed} "
                "passed (right status and message, then a correct request served)"
            )
        if self.faults_tried:
            lines.append(
                f"reliability: faults {len(self.faults_survived)} of {len(self.faults_tried)} "
                f"survived ({', '.join(self.faults_tried)})"
            )
        if self.security_tried:
            lines.append(
                f"reliability: security {len(self.security_held)} of {len(self.security_tried)} "
                f"held ({', '.join(self.security_tried)})"
            )
        if self.load is not None:
            f = self.load
            rss = ", ".join(
                f"{name} {first:.0f} -> {last:.0f} MB ({(last / first - 1) * 100:+.1f}%)"
                for name, (first, last) in f.rss_mb.items()
            )
            lines.append(
                f"reliability: load {f.clients} clients x {f.seconds:.0f} s: {f.served} served, "
                f"{f.lost} lost, {f.resource_exhausted} RESOURCE_EXHAUSTED (queue "
                f"{f.max_queue}); RSS first -> last 10 s: {rss}"
            )
        return lines

    def to_plain(self) -> dict:
        """The tally as plain data, as a worker hands it over."""
        return dataclasses.asdict(self)

    def add(self, other: dict) -> None:
        """Count in another process's tally (`to_plain`'s dict): counts and lists add up."""
        for f in dataclasses.fields(self):
            theirs = other[f.name]
            if f.name == "load":
                self.load = LoadFigures(**theirs) if theirs is not None else self.load
            else:
                setattr(self, f.name, getattr(self, f.name) + theirs)


TALLY = pytest.StashKey[Tally]()
