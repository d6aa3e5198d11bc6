"""On a GPU: the allocator configuration `python -m diffusion_service` writes after its imports
and start-up checks (`--cuda-allocator`) still reaches torch's allocator, which reads it when
CUDA first allocates: the process's segments are expandable, or not with `default`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers.processes import ROOT

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# What `main` does up to the first CUDA allocation (`--preset fast` counts the GPUs), then one
# allocation and its segments.
SCRIPT = """
import json, sys
import diffusion_service.__main__ as main
from serving.service.cuda_allocator import configure_cuda_allocator
settings = main.parse_settings(sys.argv[1:])
main.check_startup(settings, serves_grpc=False)
configure_cuda_allocator(settings.cuda_allocator)
import torch
x = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
print(json.dumps([s["is_expandable"] for s in torch.cuda.memory_snapshot()]))
"""


@pytest.mark.parametrize(("choice", "expandable"), [("expandable", True), ("default", False)])
def test_the_service_process_allocates_expandable_segments_when_asked(
    tiny_model_dir, choice, expandable
):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, "--model", str(tiny_model_dir), "--device", "cuda",
         "--preset", "fast", "--cuda-allocator", choice],
        cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    segments = json.loads(run.stdout.strip().splitlines()[-1])
    assert segments and all(s is expandable for s in segments), segments
