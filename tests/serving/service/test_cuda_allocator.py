"""`serving.service.cuda_allocator`: `--cuda-allocator` writes the allocator's configuration to
the environment unless the operator's environment names one, which wins and is logged."""

from __future__ import annotations

import logging

import pytest

from serving.service.cuda_allocator import configure_cuda_allocator


def test_expandable_sets_expandable_segments_in_an_environment_without_one(caplog):
    env = {"PATH": "/bin"}
    with caplog.at_level(logging.INFO):
        configure_cuda_allocator("expandable", env)
    assert env == {"PATH": "/bin", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (--cuda-allocator expandable)" in (
        caplog.text
    )


def test_default_leaves_the_environment_alone():
    env = {"PATH": "/bin"}
    configure_cuda_allocator("default", env)
    assert env == {"PATH": "/bin"}


@pytest.mark.parametrize("name", ["PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"])
@pytest.mark.parametrize("choice", ["expandable", "default"])
def test_the_operators_configuration_wins_and_is_logged(caplog, name, choice):
    env = {name: "max_split_size_mb:64"}
    with caplog.at_level(logging.INFO):
        configure_cuda_allocator(choice, env)
    assert env == {name: "max_split_size_mb:64"}
    assert (
        f"{name}=max_split_size_mb:64 from the environment (--cuda-allocator {choice} not applied)"
        in caplog.text
    )
