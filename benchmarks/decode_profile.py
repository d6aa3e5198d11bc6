"""Where one text-decoding step's time goes: the whole `TextDecoder.step` (host work, uploads,
the captured step, the logits' read-back) against the captured step replayed alone, and the GPU
time per kernel group of one eager step. Random weights with BAGEL-7B-MoT's und expert and LM
head (`--preset 7b`) or the tiny shapes.

    python -m benchmarks.decode_profile --preset 7b --device cuda [--batches 1,8] [--kv 128]
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script: the repo root, not benchmarks/, heads the import path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from bagel.text.batched_step import bucket, decode_step
from bagel.text.decoding import Sampling, TextDecoder
from benchmarks._report import emit_json
from benchmarks.decode import NO_END, build, text_prompt
from benchmarks.profile_forward import group_of


def step_inputs(decoder: TextDecoder) -> tuple[int, int, tuple[torch.Tensor, ...]]:
    """The rows, span and device inputs `TextDecoder.step` would use now."""
    count = len(decoder.active)
    rows = bucket(count, 1, decoder.max_batch) if decoder.graphs else count
    longest = max(r.kv_len for r in decoder.active) + 1
    span = bucket(longest, decoder.MIN_SPAN, decoder.cache.capacity)
    tokens = torch.zeros(rows, dtype=torch.long)
    positions = torch.zeros(rows, dtype=torch.long)
    lengths = torch.zeros(rows, dtype=torch.long)
    for r in decoder.active:
        tokens[r.slot], positions[r.slot], lengths[r.slot] = r.next_token, r.position, r.kv_len
    inputs = tuple(x.to(decoder.device) for x in (tokens, positions, lengths))
    return rows, span, inputs


def measure(model, batch: int, kv: int, repeats: int, device: str) -> dict:
    decoder = TextDecoder(model, batch, kv + 4 * repeats + 64)
    for i in range(batch):
        prompt, position = text_prompt(model, kv, seed=i)
        decoder.join(i, prompt, position, Sampling(4 * repeats + 32), NO_END)
    for _ in range(5):  # captures and heuristics out of the timings
        decoder.step()
    torch.cuda.synchronize()
    whole = []
    for _ in range(repeats):
        started = time.perf_counter()
        decoder.step()
        whole.append((time.perf_counter() - started) * 1e3)
    rows, span, inputs = step_inputs(decoder)
    call = decoder._forward(rows, span)
    call(*inputs)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        call(*inputs)
    end.record()
    torch.cuda.synchronize()
    replay = start.elapsed_time(end) / repeats
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decode_step(model, decoder.cache, span, *inputs)
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    groups: dict[str, float] = defaultdict(float)
    for e in kernels:
        groups[group_of(e.key)] += e.self_device_time_total / 1e3
    ranked = sorted(kernels, key=lambda e: -e.self_device_time_total)[:15]
    return {
        "batch": batch,
        "kv": kv,
        "span": span,
        "step_ms": statistics.median(whole),
        "replay_ms": replay,
        "eager_gpu_ms": sum(groups.values()),
        "groups_ms": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
        "top_kernels": [
            {"ms": e.self_device_time_total / 1e3, "calls": e.count, "name": e.key[:100]}
            for e in ranked
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("tiny", "7b"), default="7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", default="1,8", help="concurrent requests, comma-separated")
    parser.add_argument("--kv", type=int, default=128, help="prompt tokens per request")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.device != "cuda" or not torch.cuda.is_available():
        parser.error("the profile times CUDA graphs: it needs --device cuda and a GPU")
    model, _, _ = build(args.preset, args.device, torch.bfloat16, None)
    results = [
        measure(model, int(b), args.kv, args.repeats, args.device) for b in args.batches.split(",")
    ]
    print("| batch | span | whole step ms | captured step replayed ms | eager GPU ms |")
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['batch']} | {r['span']} | {r['step_ms']:.3f} | {r['replay_ms']:.3f} "
            f"| {r['eager_gpu_ms']:.3f} |"
        )
    for r in results:
        print(f"\nbatch {r['batch']}: GPU ms per kernel group of one eager step")
        for group, ms in r["groups_ms"].items():
            print(f"  {group:20s} {ms:8.3f}")
        for k in r["top_kernels"]:
            print(f"  {k['ms']:8.3f} ms x{k['calls']:4d}  {k['name']}")
    emit_json({"results": results}, args.json)


if __name__ == "__main__":
    main()
