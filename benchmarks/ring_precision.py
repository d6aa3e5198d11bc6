"""How far Ring attention's bf16 first forward sits from the one-GPU path, and why.

On one GPU, at full BAGEL-7B-MoT shapes with random weights (bf16), it runs the first forward
of a 1024² request (two CFG branches batched) with the one-GPU attention and with attention
split the way Ring splits it (the joint keys plus block 0, then the other latent blocks, merged
by log-sum-exp in fp32), in several precisions of the per-block kernels, and prints each
variant's max / L2 relative difference from the one-GPU forward and from an fp32-attention
forward. No communication is involved: this isolates the arithmetic.

    python -m benchmarks.ring_precision [--degree 2] [--size 1024]
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script: the repo root, not benchmarks/, heads the import path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import json

import torch
from torch import Tensor

from bagel.diffusion.generation import BlockVelocity
from bagel.diffusion.sampler import initial_noise
from bagel.network.attention import BlockQKV, full_block_attention
from bagel.network.config import BAGEL_7B
from bagel.network.kv import Branch
from bagel.network.latents import latent_position_ids
from benchmarks.sp_gpu import MARKERS, SMOKE, contexts_for, exact_full_attention, random_model
from diffusion_service.parallel.lse import (
    _explicit_attention_with_lse,
    attention_with_lse,
    merge_attention,
)
from serving.params import GenerationParams


def split_attention(degree: int, kernel_dtype: torch.dtype | None, exact: bool = False):
    """A one-process `BlockAttention` that splits the latent keys into `degree` blocks as Ring
    does and merges the blocks in fp32. `kernel_dtype` casts q/k/v for the per-block kernel."""

    def attend(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if exact:
            return _explicit_attention_with_lse(q, k, v, None)
        if kernel_dtype is not None:
            q, k, v = q.to(kernel_dtype), k.to(kernel_dtype), v.to(kernel_dtype)
        return attention_with_lse(q, k, v)

    def attention(x: BlockQKV) -> tuple[Tensor, Tensor]:
        assert x.joint_key_mask is None
        jq, jk, jv, lq, lk, lv = x.joint_q, x.joint_k, x.joint_v, x.latent_q, x.latent_k, x.latent_v
        n = lk.shape[1]
        bounds = [n * i // degree for i in range(degree + 1)]
        blocks = [(lk[:, a:b], lv[:, a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
        q = torch.cat([jq, lq], dim=1)
        out, lse = attend(q, torch.cat([jk, blocks[0][0]], 1), torch.cat([jv, blocks[0][1]], 1))
        for bk, bv in blocks[1:]:
            out, lse = merge_attention(out, lse, *attend(q, bk, bv))
        out = out.to(lq.dtype)
        return out[:, : jq.shape[1]], out[:, jq.shape[1] :]

    return attention


def rel(a: dict, b: dict) -> tuple[float, float]:
    mx = max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in a)
    l2 = max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in a)
    return mx, l2


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--degree", type=int, default=2)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu-smoke", action="store_true", help="a tiny model on CPU, fp32")
    args = parser.parse_args()
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    config, dtype = (SMOKE, torch.float32) if args.cpu_smoke else (BAGEL_7B, torch.bfloat16)
    model = random_model(config, device, dtype, args.seed)
    params = GenerationParams(height=args.size, width=args.size, seed=7)
    rows, cols = model.config.latent_grid(params.height, params.width)
    contexts = contexts_for(model, args.seed, 32)
    noise = initial_noise(params, rows * cols, model.config.patch_dim).to(device)
    pos_ids = latent_position_ids(rows, cols, model.config.max_latent_size)

    def forward(attention) -> dict[Branch, Tensor]:
        velocity = BlockVelocity(model, contexts, pos_ids, MARKERS, attention=attention)
        out = velocity(noise, torch.tensor(1.0), (Branch.COND, Branch.UNCOND_TEXT))
        return {b: v.float() for b, v in out.items()}

    reference = forward(full_block_attention)
    exact = forward(exact_full_attention)
    variants = {
        "1 GPU (reference)": reference,
        "1 GPU, fp32 attention": exact,
        f"split {args.degree}, bf16 blocks": forward(split_attention(args.degree, None)),
        f"split {args.degree}, fp16 blocks": forward(split_attention(args.degree, torch.float16)),
        f"split {args.degree}, fp32 blocks": forward(split_attention(args.degree, None, True)),
    }
    results = {}
    print(
        f"{'variant':<28} {'vs 1 GPU max':>13} {'vs 1 GPU L2':>12} {'vs fp32 max':>12} {'vs fp32 L2':>11}"
    )
    for name, out in variants.items():
        a = rel(out, reference)
        b = rel(out, exact)
        results[name] = {"vs_1gpu": a, "vs_fp32_attention": b}
        print(f"{name:<28} {a[0]:>13.2e} {a[1]:>12.2e} {b[0]:>12.2e} {b[1]:>11.2e}")
    name = "CPU (smoke)" if args.cpu_smoke else torch.cuda.get_device_name(0)
    print(json.dumps({"device": name, "results": results}))


if __name__ == "__main__":
    main()
