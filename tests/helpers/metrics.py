"""Read a service's Prometheus metrics page over HTTP, for tests."""

from __future__ import annotations

import time
import urllib.request


def metrics_when(port: int, needle: str, timeout: float = 10.0) -> str:
    """The metrics page once it contains `needle` (or, after `timeout`, as it is)."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        if needle in text or time.monotonic() > deadline:
            return text
        time.sleep(0.05)
