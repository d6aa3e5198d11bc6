"""Leaving the rank group drops the kept captures first and never hangs on the destroy."""

from __future__ import annotations

import threading
import time

import pytest
import torch.distributed as dist

from bagel.diffusion.generation import ForwardGraphs
from diffusion_service import worker


class _Runtime:
    def __init__(self) -> None:
        self.graphs = ForwardGraphs()
        self.graphs._entries["capture"] = object()


@pytest.fixture
def initialized(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)


def test_captures_are_dropped_before_the_group_is_destroyed(initialized, monkeypatch):
    runtime = _Runtime()
    seen = []
    monkeypatch.setattr(
        dist, "destroy_process_group", lambda: seen.append(len(runtime.graphs._entries))
    )
    worker.leave_group(runtime)
    assert seen == [0]


def test_a_hanging_destroy_is_left_behind_after_the_timeout(initialized, monkeypatch, caplog):
    release = threading.Event()
    monkeypatch.setattr(dist, "destroy_process_group", lambda: release.wait(30))
    start = time.monotonic()
    worker.leave_group(_Runtime(), timeout=0.3)
    assert time.monotonic() - start < 5
    assert "left behind" in caplog.text
    release.set()


def test_a_failing_destroy_still_raises(initialized, monkeypatch):
    def fail():
        raise RuntimeError("broken group")

    monkeypatch.setattr(dist, "destroy_process_group", fail)
    with pytest.raises(RuntimeError, match="broken group"):
        worker.leave_group(None)
