"""`benchmarks.batch_forward`'s batched forward computes what each request's forward alone does
(fp32, CPU): otherwise its throughput would be that of some other computation."""

from __future__ import annotations

import pytest
import torch

from bagel.network.latents import latent_position_ids
from benchmarks.batch_forward import alone, batched_forward, batched_prefix, requests_for
from benchmarks.sp_gpu import SMOKE, random_model


@pytest.fixture(scope="module")
def model():
    return random_model(SMOKE, torch.device("cpu"), torch.float32, 0, init="scaled")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def test_each_requests_rows_equal_its_forward_alone(model):
    rows, cols = model.config.latent_grid(64, 64)
    pos_ids = latent_position_ids(rows, cols, model.config.max_latent_size)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, rows * cols, model.config.patch_dim, generator=gen)
    t = torch.tensor([0.9, 0.5, 0.2])  # each request at its own step
    requests = requests_for(model, 3, 8)
    out = batched_forward(model, batched_prefix(requests), pos_ids)(x, t)
    assert out.shape == (6, rows * cols, model.config.patch_dim)
    refs = [alone(model, req, pos_ids, x[r], t[r]) for r, req in enumerate(requests)]
    for r, ref in enumerate(refs):
        assert _relative(out[2 * r : 2 * r + 2], ref) <= 1e-5
    # The comparison bites: another request's rows, or this request at another request's time
    # (its own latents and prompt), are far off.
    assert _relative(out[0:2], refs[1]) > 1e-2
    other_time = alone(model, requests[0], pos_ids, x[0], t[1])
    assert _relative(out[0:2], other_time) > 1e-3
