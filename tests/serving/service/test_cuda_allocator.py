"""`serving.service.cuda_allocator`: `--cuda-allocator` (its default, choices and help) writes the
allocator's configuration to the environment unless the operator's environment names one, which
wins; every outcome is logged."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

import pytest

from serving.flags import build_parser, from_args
from serving.service.cuda_allocator import (
    ALLOCATOR_CONF,
    configure_cuda_allocator,
    cuda_allocator_option,
)


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


def test_the_flag_defaults_to_expandable_and_takes_the_two_choices():
    # Built inside the test, so that mutation testing sees the test call the function.
    @dataclass(frozen=True)
    class CudaSettings:
        cuda_allocator: str = cuda_allocator_option()

    [field] = dataclasses.fields(CudaSettings)
    assert field.default == "expandable"
    assert field.metadata == {
        "help": "CUDA caching allocator: expandable (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:"
        "True, less memory reserved beside the tensors) or default (torch's); a "
        "PYTORCH_CUDA_ALLOC_CONF or PYTORCH_ALLOC_CONF in the environment wins over either",
        "metavar": None,
        "choices": ("expandable", "default"),
        "flag": None,
        "parse": None,
    }
    parser = build_parser(CudaSettings, "svc")
    assert from_args(CudaSettings, parser.parse_args([])).cuda_allocator == "expandable"
    got = from_args(CudaSettings, parser.parse_args(["--cuda-allocator", "default"]))
    assert got.cuda_allocator == "default"
    with pytest.raises(SystemExit):
        parser.parse_args(["--cuda-allocator", "native"])


def test_each_choice_writes_its_configuration():
    assert ALLOCATOR_CONF == {"expandable": "expandable_segments:True", "default": None}
    with pytest.raises(KeyError):
        configure_cuda_allocator("native", {})


def messages(caplog) -> list[tuple[str, int, str]]:
    return [(r.name, r.levelno, r.getMessage()) for r in caplog.records]


def test_each_outcome_is_logged_once_at_info(caplog):
    name = "serving.service.cuda_allocator"
    with caplog.at_level(logging.INFO, logger=name):
        configure_cuda_allocator("expandable", {})
        configure_cuda_allocator("default", {})
        configure_cuda_allocator("default", {"PYTORCH_ALLOC_CONF": "x:1"})
    assert messages(caplog) == [
        (
            name,
            logging.INFO,
            "CUDA allocator: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "
            "(--cuda-allocator expandable)",
        ),
        (name, logging.INFO, "CUDA allocator: torch's default (--cuda-allocator default)"),
        (
            name,
            logging.INFO,
            "CUDA allocator: PYTORCH_ALLOC_CONF=x:1 from the environment (--cuda-allocator "
            "default not applied)",
        ),
    ]


def test_with_both_variables_set_the_one_torch_reads_first_is_named(caplog):
    env = {"PYTORCH_CUDA_ALLOC_CONF": "cuda:1", "PYTORCH_ALLOC_CONF": "alloc:2"}
    with caplog.at_level(logging.INFO):
        configure_cuda_allocator("expandable", env)
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "cuda:1", "PYTORCH_ALLOC_CONF": "alloc:2"}
    assert [m for _, _, m in messages(caplog)] == [
        "CUDA allocator: PYTORCH_ALLOC_CONF=alloc:2 from the environment (--cuda-allocator "
        "expandable not applied)"
    ]


def test_an_empty_operators_value_still_wins():
    env = {"PYTORCH_CUDA_ALLOC_CONF": ""}
    configure_cuda_allocator("expandable", env)
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": ""}


def test_the_process_environment_is_the_default(monkeypatch):
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.setenv(name, "")  # so that undoing the delenv removes what the call writes
        monkeypatch.delenv(name)
    configure_cuda_allocator("expandable")
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert "PYTORCH_ALLOC_CONF" not in os.environ
