"""`python -m prefill_service --device cuda` writes `--cuda-allocator`'s configuration to its
environment before the model loads (its first CUDA call); the operator's value wins."""

from __future__ import annotations

import os

import pytest
import torch

import prefill_service.__main__ as service_main
from tests.helpers.ranks import free_port

CONF = "PYTORCH_CUDA_ALLOC_CONF"


@pytest.mark.parametrize(
    ("operator", "argv", "want"),
    [
        (None, [], "expandable_segments:True"),
        (None, ["--cuda-allocator", "default"], None),
        ("max_split_size_mb:64", [], "max_split_size_mb:64"),
    ],
)
def test_the_allocator_is_configured_before_the_model_loads(
    monkeypatch, tiny_model_dir, operator, argv, want
):
    for name in (CONF, "PYTORCH_ALLOC_CONF"):
        monkeypatch.setenv(name, "")  # so that undoing the delenv removes what main writes
        monkeypatch.delenv(name)
    if operator is not None:
        monkeypatch.setenv(CONF, operator)
    monkeypatch.setattr(service_main, "device_fault", lambda device: None)  # no GPU here
    seen = []

    async def serve(settings, load):  # stands in for the server, which loads the model first
        seen.append((os.environ.get(CONF), torch.cuda.is_initialized()))
        return 0

    monkeypatch.setattr(service_main, "serve", serve)
    listen = f"127.0.0.1:{free_port()}"
    argv = ["--model", str(tiny_model_dir), "--device", "cuda", "--listen", listen, *argv]
    assert service_main.main(argv) == 0
    assert seen == [(want, False)]
