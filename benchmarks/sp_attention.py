"""GPU benchmark of the SP attention at BAGEL-7B shapes: bf16 error against one GPU, and time.

Needs 2 GPUs. Times per layer call, median ms: `lat` synchronised before each call, `thr` 20
calls back to back (CPU launch cost included), `cpu` host time per call, `graph` the call
captured in a CUDA graph (GPU time only).

    python -m benchmarks.sp_attention [--port 29555]
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script: the repo root, not benchmarks/, heads the import path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import dataclasses
import os
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bagel.network.attention import BlockQKV, full_block_attention
from diffusion_service.parallel.config import ParallelConfig
from diffusion_service.parallel.mesh import ParallelMesh
from diffusion_service.parallel.registry import make_block_attention

HEADS, KV_HEADS, HEAD_DIM = 28, 4, 128
PROMPT = 30  # prompt-prefix keys in front of the two markers
# (batch, latent tokens, joint key mask): 1024^2 and 2048^2 images; B=2 is the CFG-batched
# forward, whose prefixes differ in length and so need a mask.
CASES = [(1, 4096, False), (2, 4096, True), (1, 16384, False), (2, 16384, True)]
TOPOLOGIES = [ParallelConfig(ring=2), ParallelConfig(ulysses=2), ParallelConfig(kv_gather=2)]


def block_inputs(batch: int, num_latent: int, masked: bool, device: torch.device) -> BlockQKV:
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(length: int, heads: int) -> torch.Tensor:
        return torch.randn(batch, length, heads, HEAD_DIM, generator=gen, device=device).bfloat16()

    joint_len = PROMPT + 2
    mask = None
    if masked:
        mask = torch.ones(batch, joint_len, dtype=torch.bool, device=device)
        mask[1:, PROMPT // 2 : PROMPT] = False
    return BlockQKV(
        joint_q=randn(2, HEADS),
        joint_k=randn(joint_len, KV_HEADS),
        joint_v=randn(joint_len, KV_HEADS),
        joint_key_mask=mask,
        latent_q=randn(num_latent, HEADS),
        latent_k=randn(num_latent, KV_HEADS),
        latent_v=randn(num_latent, KV_HEADS),
    )


def _events_ms(fn, repeat: int) -> float:
    dist.barrier()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def timings(fn, samples: int = 15) -> dict[str, float]:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    result = {
        "lat": statistics.median(_events_ms(fn, 1) for _ in range(samples)),
        "thr": statistics.median(_events_ms(fn, 20) for _ in range(samples)),
    }
    dist.barrier()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        fn()
    result["cpu"] = (time.perf_counter() - t0) / 20 * 1e3
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        result["graph"] = statistics.median(_events_ms(graph.replay, 20) for _ in range(samples))
    except Exception as err:  # noqa: BLE001 - reported, the other numbers still stand
        print(f"graph capture failed: {type(err).__name__}: {str(err)[:200]}", flush=True)
        result["graph"] = float("nan")
    return result


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def fmt(t: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in t.items())


def rank_main(rank: int, world: int, port: int) -> None:
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group(
        "nccl",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
        device_id=device,
    )

    def say(text: str) -> None:
        if rank == 0:
            print(text, flush=True)

    say(f"{torch.cuda.get_device_name()} x{world}, torch {torch.__version__}; ms per layer call")
    for batch, num_latent, masked in CASES:
        x = block_inputs(batch, num_latent, masked, device)
        ref_joint, ref_latent = full_block_attention(x)
        say(f"--- B={batch} latent={num_latent} mask={masked}")
        say(f"  1 GPU full_block_attention: {fmt(timings(lambda x=x: full_block_attention(x)))}")
        for config in TOPOLOGIES:
            mesh = ParallelMesh.build(config, num_heads=HEADS, num_kv_heads=KV_HEADS)
            sharding = mesh.latent_sharding(num_latent)
            attn = make_block_attention(mesh, sharding)
            local = dataclasses.replace(
                x,
                latent_q=sharding.shard(x.latent_q),
                latent_k=sharding.shard(x.latent_k),
                latent_v=sharding.shard(x.latent_v),
            )
            joint, latent = attn(local)
            full = sharding.gather(latent.contiguous(), mesh.sp_group)
            err = max(relative(full, ref_latent), relative(joint, ref_joint))
            t = timings(lambda attn=attn, local=local: attn(local))
            say(f"  {config.describe()}: err vs 1 GPU {err:.1e}; {fmt(t)}")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=29555, help="rendezvous port on 127.0.0.1")
    args = parser.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit("needs 2 GPUs")
    mp.spawn(rank_main, args=(2, args.port), nprocs=2)
    os._exit(0)


if __name__ == "__main__":
    main()
