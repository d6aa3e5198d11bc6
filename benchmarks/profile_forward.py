"""Where one generation forward's GPU time goes, at BAGEL-7B-MoT shapes with random weights.

Times a captured forward (CUDA graph replay) with one and with two CFG branches at 1024², then
profiles one eager forward with two branches and prints the GPU time per kernel group (matmuls,
attention, norms, RoPE, elementwise, copies) and the top kernels.

    python -m benchmarks.profile_forward [--size 1024] [--top 25]

`--compile` instead times the captured forward with every decoder layer's `forward_block` under
`torch.compile` (the Triton kernels of `bagel.kernels.fused` kept), against the same forward
without.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script: the repo root, not benchmarks/, heads the import path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import json
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from bagel.diffusion.generation import BlockVelocity, ForwardGraphs
from bagel.diffusion.sampler import initial_noise
from bagel.network.config import BAGEL_7B
from bagel.network.kv import Branch
from bagel.network.latents import latent_position_ids
from benchmarks.sp_gpu import MARKERS, contexts_for, random_model
from serving.params import GenerationParams

GROUPS = (
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("matmul", ("gemm", "sm90_xmma", "cutlass", "nvjet", "matmul")),
    ("norm", ("rms", "norm")),
    ("copy", ("copy", "memcpy", "memset", "cat")),
)


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k in low for k in keys):
            return group
    return "elementwise/other"


def time_replay(velocity: BlockVelocity, noise, branches, repeats: int = 10) -> float:
    t = torch.tensor(0.9)
    for _ in range(3):
        velocity(noise, t, branches)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        velocity(noise, t, branches)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def compiled_times(model, contexts, pos_ids, noise, both) -> dict[str, float]:
    """The captured forward with each layer's `forward_block` compiled (one compiled graph shared
    by the 28 layers: same code, parameters as inputs)."""
    import time

    torch._dynamo.config.cache_size_limit = 64
    for layer in model.layers:
        layer.forward_block = torch.compile(layer.forward_block, dynamic=False)
    started = time.perf_counter()
    eager = BlockVelocity(model, contexts, pos_ids, MARKERS)
    eager(noise, torch.tensor(0.9), both)  # compiles
    torch.cuda.synchronize()
    out = {"compile (s)": time.perf_counter() - started}
    print(json.dumps(out), flush=True)
    out["compiled eager, 2 branches (ms)"] = time_replay(eager, noise, both, repeats=3)
    graphed = BlockVelocity(model, contexts, pos_ids, MARKERS, graphs=ForwardGraphs())
    out["compiled graph, 2 branches (ms)"] = time_replay(graphed, noise, both)
    return out


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--compile", action="store_true", help="time torch.compile'd layers, no profile"
    )
    args = parser.parse_args()
    device = torch.device("cuda")
    model = random_model(BAGEL_7B, device, torch.bfloat16, 0)
    params = GenerationParams(height=args.size, width=args.size, seed=7)
    rows, cols = model.config.latent_grid(params.height, params.width)
    contexts = contexts_for(model, 0, 32)
    noise = initial_noise(params, rows * cols, model.config.patch_dim).to(device)
    pos_ids = latent_position_ids(rows, cols, model.config.max_latent_size)
    both = (Branch.COND, Branch.UNCOND_TEXT)

    graphed = BlockVelocity(model, contexts, pos_ids, MARKERS, graphs=ForwardGraphs())
    times = {
        "graph, 2 branches (ms)": time_replay(graphed, noise, both),
        "graph, 1 branch (ms)": time_replay(graphed, noise, (Branch.COND,)),
    }
    if args.compile:
        print(json.dumps(times), flush=True)
        times.update(compiled_times(model, contexts, pos_ids, noise, both))
        print(json.dumps({"device": torch.cuda.get_device_name(0), "times_ms": times}))
        return
    eager = BlockVelocity(model, contexts, pos_ids, MARKERS)
    times["eager, 2 branches (ms)"] = time_replay(eager, noise, both, repeats=3)
    for k, v in times.items():
        print(f"{k:<26} {v:8.2f}")

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        eager(noise, torch.tensor(0.9), both)
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.self_device_time_total for e in kernels) / 1e3
    groups: dict[str, float] = defaultdict(float)
    for e in kernels:
        groups[group_of(e.key)] += e.self_device_time_total / 1e3
    print(f"\nGPU time of one eager forward, 2 branches: {total:.2f} ms")
    for g, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {g:<20} {ms:8.2f} ms  {100 * ms / total:5.1f}%")
    print(f"\ntop {args.top} kernels (self GPU ms, calls):")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[: args.top]:
        print(f"  {e.self_device_time_total / 1e3:8.2f}  {e.count:5d}  {e.key[:110]}")
    print(
        json.dumps(
            {"device": torch.cuda.get_device_name(0), "times_ms": times, "groups_ms": groups}
        )
    )


if __name__ == "__main__":
    main()
