"""Shared fixtures: the tiny checkpoint, written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from bagel.tiny import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-bagel")
    write_tiny_checkpoint(directory, seed=0)
    return directory
