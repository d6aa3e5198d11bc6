"""Kept CUDA-graph captures serve later requests correctly after the request that captured them
is gone and its memory has been reused (GPU only; on a CPU the captures run eagerly)."""

from __future__ import annotations

import gc

import pytest
import torch

from bagel.checkpoints.checkpoint import load_bagel
from bagel.diffusion.generation import BlockVelocity, ForwardGraphs
from bagel.network.kv import Branch
from bagel.network.latents import latent_position_ids

BOTH = (Branch.COND, Branch.UNCOND_TEXT)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_a_capture_outlives_the_request_that_made_it(tiny_model_dir):
    model = load_bagel(tiny_model_dir, "diffusion", dtype=torch.bfloat16, device="cuda")
    noise = torch.randn(64, model.config.patch_dim, generator=torch.Generator().manual_seed(0))
    pos_ids = latent_position_ids(8, 8, model.config.max_latent_size)
    graphs = ForwardGraphs()
    t = torch.tensor(0.7)

    def velocity(prompt: list[int], graphs: ForwardGraphs | None) -> BlockVelocity:
        cond, uncond = model.prefill([prompt, []])
        return BlockVelocity(model, {"c": cond, "u": uncond}, pos_ids, (1, 2), graphs=graphs)

    first = velocity([5, 17, 29, 3], graphs)
    first(noise, t, ("c", "u"))  # captures
    del first
    gc.collect()
    # Reuse the freed memory with values that would index out of range if read as token ids.
    junk = [torch.full((n,), 10**9, dtype=torch.int64, device="cuda") for n in (2, 4, 64, 512)]
    second_prompt = [7, 8, 9, 10]
    replayed = velocity(second_prompt, graphs)(noise, t, ("c", "u"))
    eager = velocity(second_prompt, None)(noise, t, ("c", "u"))
    torch.cuda.synchronize()
    del junk
    for b in ("c", "u"):
        assert torch.equal(replayed[b], eager[b]), b


def test_step_cache_ranges_replayed_from_captures_equal_eager(tiny_model_dir):
    """The front, middle and back ranges are three captures with the decision between them; a
    forced compute-one-reuse-one schedule replays both paths and matches eager bit for bit."""
    from serving.params import DBCache
    from step_cache.collective import make_step_cache

    model = load_bagel(tiny_model_dir, "diffusion", dtype=torch.bfloat16, device="cuda")
    noise = torch.randn(64, model.config.patch_dim, generator=torch.Generator().manual_seed(1))
    pos_ids = latent_position_ids(8, 8, model.config.max_latent_size)
    cond, uncond = model.prefill([[5, 17, 29], []])
    policy = DBCache(
        fn_compute_blocks=1, max_warmup_steps=1, max_continuous_cached_steps=1,
        residual_diff_threshold=10.0, taylorseer_order=1,
    )  # fmt: skip

    def run(graphs: ForwardGraphs | None) -> list[torch.Tensor]:
        cache = make_step_cache(policy, 64, lambda x: x)
        velocity = BlockVelocity(
            model,
            {Branch.COND: cond, Branch.UNCOND_TEXT: uncond},
            pos_ids,
            (1, 2),
            graphs=graphs,
            step_cache=cache,
        )
        outs, cached = [], []
        for step in range(6):
            cache.begin_step(step, 6, BOTH)
            v = velocity(noise, torch.tensor(1.0 - step / 6), BOTH)
            outs.append(torch.stack([v[b] for b in BOTH]))
            if cache.step_was_cached:
                cached.append(step)
        assert cached == [1, 3, 5]
        return outs

    replayed, eager = run(ForwardGraphs()), run(None)
    for step, (a, b) in enumerate(zip(replayed, eager, strict=True)):
        assert torch.equal(a, b), step


def test_the_marker_stream_changes_no_bit_eager_or_replayed(tiny_model_dir, monkeypatch):
    """The markers' und-expert work on a second stream (`bagel.kernels.streams`) runs the same
    kernels in another order: eager and captured forwards equal the one-stream forward bit for
    bit."""
    model = load_bagel(tiny_model_dir, "diffusion", dtype=torch.bfloat16, device="cuda")
    noise = torch.randn(64, model.config.patch_dim, generator=torch.Generator().manual_seed(2))
    pos_ids = latent_position_ids(8, 8, model.config.max_latent_size)
    cond, uncond = model.prefill([[5, 17, 29, 3], []])
    contexts = {Branch.COND: cond, Branch.UNCOND_TEXT: uncond}
    t = torch.tensor(0.6)

    def forward(graphs: ForwardGraphs | None) -> torch.Tensor:
        v = BlockVelocity(model, contexts, pos_ids, (1, 2), graphs=graphs)(noise, t, BOTH)
        return torch.stack([v[b] for b in BOTH]).clone()

    monkeypatch.setenv("BAGEL_MARKER_STREAM", "0")
    one_stream = forward(None)
    monkeypatch.setenv("BAGEL_MARKER_STREAM", "1")
    assert model._marker_stream(noise.cuda()) is not None
    assert torch.equal(forward(None), one_stream)
    graphs = ForwardGraphs()
    for _ in range(3):  # the capture, then replays
        assert torch.equal(forward(graphs), one_stream)


def test_the_decode_captured_in_the_forwards_pool_equals_the_eager_decode(tiny_model_dir):
    from bagel.checkpoints.checkpoint import load_autoencoder
    from bagel.diffusion.pixels import decode_image

    model = load_bagel(tiny_model_dir, "diffusion", dtype=torch.bfloat16, device="cuda")
    ae = load_autoencoder(tiny_model_dir, dtype=torch.bfloat16, device="cuda")
    graphs = ForwardGraphs()
    pos_ids = latent_position_ids(8, 8, model.config.max_latent_size)
    cond, uncond = model.prefill([[5, 17], []])
    velocity = BlockVelocity(model, {"c": cond, "u": uncond}, pos_ids, (1, 2), graphs=graphs)
    for seed in (3, 4):
        latents = torch.randn(
            64, model.config.patch_dim, generator=torch.Generator().manual_seed(seed)
        )
        velocity(latents, torch.tensor(0.5), ("c", "u"))  # a forward replay between decodes
        size = 8 * model.config.pixels_per_token
        captured = decode_image(ae, model.config, latents, size, size, graphs)
        eager = decode_image(ae, model.config, latents, size, size)
        assert list(captured.getdata()) == list(eager.getdata()), seed
