"""Whether several requests in one generation forward pay, and attention's share of the forward,
at BAGEL-7B-MoT shapes with random weights.

For each image size and each batch of R text-to-image requests (two CFG branches each, so 2R
branch rows per forward) it times the captured forward (CUDA graph replay, median of
`--repeats`) and reports request-forwards/s (R over the forward's time; images/s is that over
the step count) and the ratio to batch 1. Then it profiles eager forwards (`--profiles
SIZE:BATCH ...`) and prints the GPU time per kernel group (attention, matmuls, ...). With
`--linear-precision bf16 fp8` it does both in one process: FP8 swaps the linear layers in
place (`bagel.network.fp8.use_fp8_linears`) after bf16's rows.

    python -m benchmarks.batch_forward [--sizes 512 1024] [--batches 1 2 4]
        [--linear-precision bf16 fp8] [--json PATH]

The model has no entry point for several requests: `Bagel.forward_block` embeds one `x_t` at one
`t` for all its branches. The batched forward here is composed of the model's own steps, with no
change to them: `embed_block` once per request (its latents, its `t`, two rows), the requests'
rows concatenated, `forward_layers` over one `BranchPrefix` of all 2R contexts (each branch's
own prompt KV; the empty unconditional prefix makes the branches ragged, so attention runs per
branch row, as it does for one request), and `velocity`. Before timing, each request's rows are
compared with that request's forward alone (`BlockVelocity`); `--smoke` runs a small model with
the same structure on the CPU in fp32.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script: the repo root, not benchmarks/, heads the import path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

from bagel.diffusion.generation import BlockVelocity
from bagel.kernels.graphs import GraphedCall, graph_or_eager
from bagel.network.attention import full_block_attention
from bagel.network.config import BAGEL_7B, BagelConfig
from bagel.network.fp8 import LINEAR_PRECISIONS, use_fp8_linears
from bagel.network.kv import Branch, ContextKV
from bagel.network.latents import latent_position_ids
from bagel.network.model import Bagel, BranchPrefix
from benchmarks._report import emit_json
from benchmarks.profile_forward import group_of
from benchmarks.sp_gpu import BOTH, MARKERS, SMOKE, contexts_for, random_model

Request = dict[Branch, ContextKV]


def requests_for(model: Bagel, batch: int, prompt_tokens: int) -> list[Request]:
    """`batch` text-to-image requests, each its own random prompt (and its empty CFG context)."""
    return [contexts_for(model, seed, prompt_tokens) for seed in range(batch)]


def batched_prefix(requests: Sequence[Request]) -> BranchPrefix:
    """One prefix of every request's CFG branches, request by request: rows 2r and 2r+1."""
    return BranchPrefix.from_contexts([req[b] for req in requests for b in BOTH])


def batched_forward(
    model: Bagel, prefix: BranchPrefix, pos_ids: Tensor
) -> Callable[[Tensor, Tensor], Tensor]:
    """`(x [R, n, patch], t [R]) -> velocity [2R, n, patch]`: each request's latents at its own
    time, all requests' branch rows in one pass of the decoder layers."""
    markers = torch.tensor(MARKERS, device=pos_ids.device)
    per_request = len(BOTH)

    @torch.no_grad()
    def forward(x: Tensor, t: Tensor) -> Tensor:
        rows = [model.embed_block(x[r], t[r], pos_ids, markers, per_request) for r in range(len(x))]
        joint = torch.cat([j for j, _ in rows])
        latent = torch.cat([lat for _, lat in rows])
        _, latent = model.forward_layers(joint, latent, prefix, full_block_attention)
        return model.velocity(latent)

    return forward


def alone(model: Bagel, request: Request, pos_ids: Tensor, x: Tensor, t: Tensor) -> Tensor:
    """One request's forward as the services run it: velocity `[2, n, patch]`."""
    out = BlockVelocity(model, request, pos_ids, MARKERS)(x, t, BOTH)
    return torch.stack([out[b] for b in BOTH])


def median_ms(call: Callable[[], Tensor], repeats: int, device: torch.device) -> float:
    for _ in range(2):
        call()
    if device.type != "cuda":
        import time

        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(repeats)
    ]
    for start, end in events:
        start.record()
        call()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def relative_error(batched: Tensor, requests: Sequence[Tensor]) -> float:
    """Worst `max|a - b| / max|b|` of the batched rows against each request alone."""
    per_request = len(BOTH)
    worst = 0.0
    for r, ref in enumerate(requests):
        got = batched[r * per_request : (r + 1) * per_request].float()
        ref = ref.float()
        worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())
    return worst


def measure(
    model: Bagel, size: int, batch: int, prompt_tokens: int, repeats: int, graphs: bool
) -> dict:
    """Time one batched forward of `batch` requests at `size`², checked against each alone."""
    device = model.vae2llm.weight.device
    rows, cols = model.config.latent_grid(size, size)
    pos_ids = latent_position_ids(rows, cols, model.config.max_latent_size).to(device)
    gen = torch.Generator().manual_seed(size + batch)
    x = torch.randn(batch, rows * cols, model.config.patch_dim, generator=gen).to(device)
    t = torch.linspace(0.9, 0.3, batch).to(device)  # requests at different steps
    requests = requests_for(model, batch, prompt_tokens)
    forward = batched_forward(model, batched_prefix(requests), pos_ids)
    refs = [alone(model, req, pos_ids, x[r], t[r]) for r, req in enumerate(requests)]
    call = graph_or_eager(forward, (x, t)) if graphs else forward
    out = {
        "graphed": isinstance(call, GraphedCall),
        "rel_err_vs_alone": relative_error(call(x, t), refs),
    }
    del refs
    out["forward_ms"] = median_ms(lambda: call(x, t), repeats, device)
    out["request_forwards_per_s"] = batch * 1e3 / out["forward_ms"]
    return out


def profile_groups(model: Bagel, size: int, batch: int, prompt_tokens: int, top: int) -> dict:
    """GPU time per kernel group of one eager forward of `batch` requests (two branches each)."""
    device = model.vae2llm.weight.device
    rows, cols = model.config.latent_grid(size, size)
    pos_ids = latent_position_ids(rows, cols, model.config.max_latent_size).to(device)
    requests = requests_for(model, batch, prompt_tokens)
    forward = batched_forward(model, batched_prefix(requests), pos_ids)
    x = torch.randn(batch, rows * cols, model.config.patch_dim, device=device)
    t = torch.linspace(0.9, 0.3, batch, device=device)
    for _ in range(2):  # Triton compiles and cuBLAS heuristics out of the profile
        forward(x, t)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        forward(x, t)
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in kernels) / 1e3
    groups: dict[str, float] = defaultdict(float)
    for e in kernels:
        groups[group_of(e.key)] += e.self_device_time_total / 1e3
    ranked = sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]
    return {
        "gpu_ms": total,
        "groups_ms": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
        "top_kernels": [
            {"ms": e.self_device_time_total / 1e3, "calls": e.count, "name": e.key[:110]}
            for e in ranked
        ],
    }


def print_tables(results: dict, sizes: Sequence[int], batches: Sequence[int], steps: int) -> None:
    head = f"{'prec':<5} {'size':>5} {'batch':>5} {'rows':>4} {'fwd ms':>8} "
    print(f"\n{head}{'req-fwd/s':>9} {'img/s@' + str(steps):>9} {'vs b1':>6} {'rel err':>8}")
    for precision, per_size in results["batching"].items():
        for size in sizes:
            first = per_size[str(size)].get(str(batches[0]))
            for batch in batches:
                m = per_size[str(size)].get(str(batch))
                if m is None or "forward_ms" not in m:
                    print(f"{precision:<5} {size:>5} {batch:>5}  {m}")
                    continue
                ratio = m["request_forwards_per_s"] / first["request_forwards_per_s"]
                print(
                    f"{precision:<5} {size:>5} {batch:>5} {2 * batch:>4} {m['forward_ms']:>8.2f} "
                    f"{m['request_forwards_per_s']:>9.2f} "
                    f"{m['request_forwards_per_s'] / steps:>9.3f} {ratio:>6.3f} "
                    f"{m['rel_err_vs_alone']:>8.1e}"
                )
    for key, prof in results.get("profiles", {}).items():
        if "gpu_ms" not in prof:
            print(f"\nprofile {key}: {prof}")
            continue
        precision, size, batch = key.split(":")
        print(f"\nGPU time of one eager forward, {precision}, {size}², {batch} request(s):")
        print(f"  {'total':<20} {prof['gpu_ms']:8.2f} ms")
        for group, ms in prof["groups_ms"].items():
            print(f"  {group:<20} {ms:8.2f} ms  {100 * ms / prof['gpu_ms']:5.1f}%")
        for k in prof["top_kernels"]:
            print(f"    {k['ms']:8.2f}  {k['calls']:5d}  {k['name']}")


def build_model(smoke: bool, device: torch.device) -> Bagel:
    config: BagelConfig = SMOKE if smoke else BAGEL_7B
    dtype = torch.float32 if smoke else torch.bfloat16
    return random_model(config, device, dtype, 0, init="scaled")


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--linear-precision", nargs="+", choices=LINEAR_PRECISIONS, default=["bf16", "fp8"]
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed replays per row")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50, help="timesteps per image, for img/s")
    parser.add_argument(
        "--profiles",
        nargs="*",
        default=["1024:1", "512:1", "512:4"],
        help="SIZE:BATCH forwards to profile eagerly in each precision (none: no profile)",
    )
    parser.add_argument("--top", type=int, default=12, help="kernels listed per profile")
    parser.add_argument("--smoke", action="store_true", help="a small fp32 model on the CPU")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    model = build_model(args.smoke, device)
    results: dict = {
        "device": "CPU" if args.smoke else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "prompt_tokens": args.prompt_tokens,
        "batching": {},
        "profiles": {},
    }
    for precision in args.linear_precision:
        if precision == "fp8":
            use_fp8_linears(model)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        per_size: dict = {}
        results["batching"][precision] = per_size
        for size in args.sizes:
            per_size[str(size)] = {}
            for batch in args.batches:
                try:
                    m = measure(
                        model, size, batch, args.prompt_tokens, args.repeats, not args.smoke
                    )
                except torch.OutOfMemoryError as e:  # a row too large must not lose the others
                    m = {"error": f"out of memory: {str(e)[:200]}"}
                per_size[str(size)][str(batch)] = m
                print(f"{precision} {size} batch {batch}: {m}", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # each capture's pool goes with its row
        for spec in args.profiles if device.type == "cuda" else ():
            size, batch = (int(v) for v in spec.split(":"))
            prof = profile_groups(model, size, batch, args.prompt_tokens, args.top)
            results["profiles"][f"{precision}:{size}:{batch}"] = prof
            torch.cuda.empty_cache()
    print_tables(results, args.sizes, args.batches, args.steps)
    emit_json(results, args.json)


if __name__ == "__main__":
    main()
