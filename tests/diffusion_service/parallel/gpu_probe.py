"""Temporary GPU probe: bf16 correctness and per-layer time of SP attention at BAGEL shapes."""

from __future__ import annotations

import os
import statistics
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from bagel.attention import full_block_attention
from diffusion_service.parallel import ulysses as ulysses_mod
from diffusion_service.parallel.mesh import ParallelMesh
from diffusion_service.parallel.usp import make_block_attention

H, HKV, D = 28, 4, 128


def inputs(batch, prefix, n, device, masked):
    g = torch.Generator(device=device).manual_seed(0)

    def r(L, h):
        return torch.randn(batch, L, h, D, generator=g, device=device).bfloat16()

    jl = prefix + 2
    mask = None
    if masked:
        mask = torch.ones(batch, jl, dtype=torch.bool, device=device)
        mask[1:, prefix // 2 : prefix] = False
    return r(2, H), r(jl, HKV), r(jl, HKV), mask, r(n, H), r(n, HKV), r(n, HKV)


def timeit(fn, iters=20, chain=20):
    """Median ms of one call: (latency, synced before each call; throughput, `chain` calls back
    to back, as layers run in a model where the CPU stays ahead of the GPU)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    lat, thr = [], []
    for _ in range(iters):
        for n, sink in ((1, lat), (chain, thr)):
            dist.barrier()
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(n):
                fn()
            e.record()
            torch.cuda.synchronize()
            sink.append(s.elapsed_time(e) / n)
    return statistics.median(lat), statistics.median(thr)


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def ideal_one_gpu(jq, jk, jv, mask, lq, lk, lv):
    q, k, v = (torch.cat(p, 1).transpose(1, 2) for p in ((jq, lq), (jk, lk), (jv, lv)))
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def rank_main(rank, world, port):
    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
        device_id=torch.device("cuda", rank),
    )
    dev = torch.device("cuda", rank)

    def say(*a):
        if rank == 0:
            print(*a, flush=True)

    # Raw communication at the sizes of one 1024^2 layer (B=1).
    a2a = torch.randn(2, 1, 2048, 18, 128, device=dev).bfloat16()
    a2a_out = torch.empty_like(a2a)
    t = timeit(lambda: dist.all_to_all_single(a2a_out, a2a))
    say(f"all_to_all_single {a2a.numel() * 2 / 1e6:.1f} MB: lat/thr {t[0]:.3f}/{t[1]:.3f} ms")
    kv = torch.randn(2, 1, 2048, 4, 128, device=dev).bfloat16()
    kv_in = torch.empty_like(kv)
    peer = 1 - rank

    def p2p():
        ops = [dist.P2POp(dist.isend, kv, peer), dist.P2POp(dist.irecv, kv_in, peer)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()

    t = timeit(p2p)
    say(f"send+recv {kv.numel() * 2 / 1e6:.1f} MB: lat/thr {t[0]:.3f}/{t[1]:.3f} ms")

    cases = [(1, 30, 4096, False), (2, 30, 4096, True), (1, 30, 16384, False), (2, 30, 16384, True)]
    for batch, prefix, n, masked in cases:
        x = inputs(batch, prefix, n, dev, masked)
        ref_j, ref_l = full_block_attention(*x)
        one = timeit(lambda x=x: full_block_attention(*x))
        say(
            f"--- B={batch} n={n} mask={masked}: 1 GPU full_block_attention lat/thr "
            f"{one[0]:.3f}/{one[1]:.3f} ms"
        )
        for ring, uly in [(1, 2), (2, 1)]:
            mesh = ParallelMesh.build(1, ring, uly, num_heads=H, num_kv_heads=HKV)
            sh = mesh.latent_sharding(n)
            attn = make_block_attention(mesh, sh)
            local = [sh.shard(t) for t in x[4:]]
            j, lat = attn(*x[:4], *local)
            full = sh.gather(lat.contiguous(), mesh.sp_group)
            err = max(rel(full, ref_l), rel(j, ref_j))
            t = timeit(lambda attn=attn, local=local, x=x: attn(*x[:4], *local))
            say(
                f"ring={ring} uly={uly}: rel err vs 1 GPU {err:.2e}, lat/thr {t[0]:.3f}/{t[1]:.3f} ms"
            )
            if uly == 2 and n == 4096:
                g = mesh.ulysses_group
                fr = [ulysses_mod.head_chunk(t, 2, rank) for t in x[:3]]
                q, k, v = ulysses_mod.seq_to_heads(g, local, fr)
                o = ulysses_mod.attend_local(q, k, v, x[3])
                parts = {
                    "seq_to_heads": lambda g=g, fr=fr, local=local: ulysses_mod.seq_to_heads(
                        g, local, fr
                    ),
                    "attend_local": lambda q=q, k=k, v=v, m=x[3]: ulysses_mod.attend_local(
                        q, k, v, m
                    ),
                    "heads_to_seq": lambda g=g, o=o: ulysses_mod.heads_to_seq(g, o, 2),
                }
                for name, fn in parts.items():
                    t = timeit(fn)
                    say(f"    {name}: lat/thr {t[0]:.3f}/{t[1]:.3f} ms")
    dist.destroy_process_group()


if __name__ == "__main__":
    world = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    mp.spawn(rank_main, args=(world, 29555), nprocs=world)
    os._exit(0)
