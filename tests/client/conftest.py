"""A fake Prefill server whose streams end without an image."""

from __future__ import annotations

import pytest

from tests.client import fake_prefill


@pytest.fixture
def no_image(monkeypatch):
    monkeypatch.setattr(fake_prefill, "FakePrefill", fake_prefill.NoImagePrefill)
    server = fake_prefill.FakePrefillServer()
    yield server
    server.stop()
