"""Sequence parallelism on GPUs at full BAGEL-7B-MoT shapes with random weights (bf16).

For each topology of a `--world`-GPU group (Ulysses, Ring, CFG parallel) it compares the first
forward and the decoded image against the one-GPU reference path (`bagel` alone) and times the
whole generation. Prints a table; the last line is one JSON object.

    python -m benchmarks.sp_gpu --world 2 --size 1024 --steps 50

Needs torch with CUDA and NCCL only (no gRPC). Random weights: the numbers are about speed and
agreement between paths, not image quality.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script: the repo root, not benchmarks/, heads the import path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import dataclasses
import json
import math
import os
import socket
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bagel.diffusion.generation import BlockVelocity, ForwardGraphs
from bagel.diffusion.pixels import decode_image
from bagel.diffusion.sampler import denoise, initial_noise
from bagel.kernels import fused
from bagel.network.attention import ATTENTION_PRECISIONS, BlockQKV, block_attention
from bagel.network.autoencoder import AutoEncoder, AutoEncoderParams
from bagel.network.config import BAGEL_7B, BagelConfig, LLMConfig
from bagel.network.fp8 import LINEAR_PRECISIONS, use_fp8_linears
from bagel.network.kv import Branch, ContextKV
from bagel.network.latents import latent_position_ids
from bagel.network.layers import RMSNorm
from bagel.network.model import Bagel
from benchmarks._report import emit_json
from diffusion_service.job import JobSpec
from diffusion_service.parallel.config import ParallelConfig
from diffusion_service.parallel.lse import _explicit_attention_with_lse
from diffusion_service.parallel.mesh import ParallelMesh
from diffusion_service.velocity import ShardedVelocity
from diffusion_service.worker import RankRuntime, run_job
from serving.params import CACHE_SPEC, GenerationParams
from step_cache.collective import make_step_cache

TOPOLOGIES = {
    "ulysses2": ParallelConfig(ulysses=2),
    "ring2": ParallelConfig(ring=2),
    "cfg2": ParallelConfig(cfg_parallel=2),
    "u2xr2": ParallelConfig(ulysses=2, ring=2),
    "kvgather2": ParallelConfig(kv_gather=2),
    "kvg2xr2": ParallelConfig(kv_gather=2, ring=2),
}
MARKERS = (151652, 151653)
BOTH = (Branch.COND, Branch.UNCOND_TEXT)  # the CFG branches of a text-to-image step


INITS = ("unit", "scaled")


@torch.no_grad()
def random_model(
    config: BagelConfig, device: torch.device, dtype: torch.dtype, seed: int, init: str = "unit"
) -> Bagel:
    """Weights drawn on the device from one seed: the same on every GPU of a kind.

    "unit": every linear layer keeps the variance of its input (std 1/sqrt(fan_in)), so each
    layer adds as much to the residual stream as it holds, and the 28 layers amplify any bf16
    rounding. "scaled": the same, but the projections that write into the residual stream
    (`o_proj*`, `down_proj`) are scaled by 1/sqrt(2 * layers), GPT-2's init for deep stacks.
    """
    with torch.device("meta"):
        model = Bagel(config, with_gen=True)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    residual_scale = 1.0 / math.sqrt(2 * config.llm.num_layers) if init == "scaled" else 1.0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            std = 1.0 / math.sqrt(module.in_features)
            if ".o_proj" in name or name.endswith("down_proj"):
                std *= residual_scale
            module.weight.normal_(0.0, std, generator=gen)
            if module.bias is not None:
                module.bias.normal_(0.0, 0.02, generator=gen)
        elif isinstance(module, RMSNorm):
            module.weight.normal_(1.0, 0.05, generator=gen)
        elif isinstance(module, torch.nn.Embedding):
            module.weight.normal_(0.0, 1.0, generator=gen)
    model.latent_pos_embed.pos_embed.normal_(0.0, 0.5, generator=gen)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def random_autoencoder(
    params: AutoEncoderParams, device: torch.device, dtype, seed: int
) -> AutoEncoder:
    torch.manual_seed(seed)
    ae = AutoEncoder(params).to(device, dtype).eval().requires_grad_(False)
    # As `load_autoencoder` leaves it on a GPU.
    return ae.to(memory_format=torch.channels_last) if device.type == "cuda" else ae


# A small model with BAGEL's structure, to check this script on a CPU (gloo) before GPU time.
SMOKE = BagelConfig(
    llm=LLMConfig(
        vocab_size=160000,
        hidden_size=224,
        intermediate_size=256,
        num_layers=2,
        num_heads=28,
        num_kv_heads=4,
    ),
    vae=AutoEncoderParams(ch=32),
)


def contexts_for(model: Bagel, seed: int, prompt_tokens: int) -> dict[Branch, ContextKV]:
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 150000, (prompt_tokens,), generator=gen).tolist()
    cond, uncond = model.prefill([prompt, []])
    return {Branch.COND: cond, Branch.UNCOND_TEXT: uncond}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def sync_time() -> float:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def memory_gib() -> dict:
    """Peak GPU memory since the last `reset_peak_memory_stats` (GiB); {} on a CPU."""
    if not torch.cuda.is_initialized():
        return {}
    gib = 1024**3
    return {
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / gib,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / gib,
    }


def start_memory_phase() -> dict:
    """Forget earlier peaks; returns what is allocated now (the weights, mostly), in GiB."""
    if not torch.cuda.is_initialized():
        return {}
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return {"weights_gib": torch.cuda.memory_allocated() / 1024**3}


def exact_full_attention(x: BlockQKV):
    """One-GPU block attention computed in fp32 (no bf16 rounding inside the kernel)."""
    q = torch.cat([x.joint_q, x.latent_q], 1)
    k = torch.cat([x.joint_k, x.latent_k], 1)
    v = torch.cat([x.joint_v, x.latent_v], 1)
    out, _ = _explicit_attention_with_lse(q, k, v, x.joint_key_mask)
    out = out.to(x.latent_q.dtype)
    joint = x.joint_q.shape[1]
    return out[:, :joint], out[:, joint:]


def relative(a: dict, b: dict) -> dict:
    """Max and L2 difference of `a` from `b` relative to `b`, worst over the branches."""
    return {
        "first_forward_rel_err": max(
            ((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in a
        ),
        "first_forward_rel_l2": max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in a),
    }


def forward_ms(velocity, x: torch.Tensor, repeats: int = 10) -> float:
    """Mean wall time of one forward of both CFG branches, outside the sampler."""
    t = torch.tensor(0.9)
    velocity(x, t, BOTH)
    start = sync_time()
    for _ in range(repeats):
        velocity(x, t, BOTH)
    return 1e3 * (sync_time() - start) / repeats


def one_gpu_generation(velocity, noise, ae, params, warmup_params, warmups: int):
    """Warm up, then one timed generation and decode on this GPU: (latents, pixels, timings)."""
    for _ in range(warmups):
        warm = denoise(noise, velocity, warmup_params)
        decode_image(ae, velocity.model.config, warm, params.height, params.width, velocity.graphs)
    start = sync_time()
    latents = denoise(noise, velocity, params)
    denoised = sync_time()
    # Peaks so far are the denoising's (captures included); from here on, the decode's.
    peaks = {f"denoise_{k}": v for k, v in memory_gib().items()}
    if torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    image = decode_image(
        ae, velocity.model.config, latents, params.height, params.width, velocity.graphs
    )
    done = sync_time()
    peaks.update({f"decode_{k}": v for k, v in memory_gib().items()})
    for key in ("peak_allocated_gib", "peak_reserved_gib"):
        if f"denoise_{key}" in peaks:
            peaks[key] = max(peaks[f"denoise_{key}"], peaks[f"decode_{key}"])
    timing = {
        **peaks,
        "forward_ms": forward_ms(velocity, noise),
        "denoise_s": denoised - start,
        "decode_s": done - denoised,
        "total_s": done - start,
    }
    return latents.float(), torch.tensor(list(image.getdata()), dtype=torch.float32), timing


def first_forward(velocity, noise: torch.Tensor, device) -> dict:
    t = torch.tensor(1.0)
    return {b: v.float() for b, v in velocity(noise.to(device), t, BOTH).items()}


def rank_main(
    rank: int, world: int, port: int, args: argparse.Namespace, results_path: str
) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    smoke = args.cpu_smoke
    device = torch.device("cpu") if smoke else torch.device("cuda", rank)
    dtype = torch.float32 if smoke else torch.bfloat16
    config = SMOKE if smoke else BAGEL_7B
    if not smoke:
        torch.cuda.set_device(device)
    dist.init_process_group(
        "gloo" if smoke else "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
        world_size=world, timeout=timedelta(minutes=10),
    )  # fmt: skip
    control = dist.new_group(backend="gloo", timeout=timedelta(minutes=10))
    model = random_model(config, device, dtype, args.seed, args.init)
    params = GenerationParams(height=args.size, width=args.size, num_timesteps=args.steps, seed=7)
    warmup = dataclasses.replace(params, num_timesteps=10)
    rows, cols = model.config.latent_grid(params.height, params.width)
    contexts = contexts_for(model, args.seed, args.prompt_tokens)
    # From here on as a diffusion rank loads it: the embedding table holds the two marker rows.
    model.language_model.model.keep_token_rows(MARKERS, device)
    noise = initial_noise(params, rows * cols, model.config.patch_dim)
    ae = random_autoencoder(config.vae, device, dtype, args.seed) if rank == 0 else None
    out = {}

    if rank == 0:  # the one-GPU reference: bagel alone, no mesh, no collectives
        velocity = BlockVelocity(
            model,
            contexts,
            latent_position_ids(rows, cols, config.max_latent_size),
            MARKERS,
            batch_branches=True,
            graphs=None if args.eager else ForwardGraphs(),
        )
        reference_first = first_forward(velocity, noise, device)
        # The bf16 noise floor: the same GPU and weights with the attention computed in fp32
        # instead of by the bf16 kernel; any exact attention that is not the very same kernel
        # (Ring's block merge is one) lands about this far from the reference.
        exact = BlockVelocity(
            model, contexts, latent_position_ids(rows, cols, config.max_latent_size), MARKERS,
            attention=exact_full_attention,
        )  # fmt: skip
        floor = first_forward(exact, noise, device)
        out["1gpu_fp32_attention"] = relative(floor, reference_first)
        print(f"noise floor: {out['1gpu_fp32_attention']}", flush=True)
        del exact, floor
        memory = start_memory_phase()
        reference_latents, reference_image, timing = one_gpu_generation(
            velocity, noise.to(device), ae, params, warmup, args.warmup
        )
        out["1gpu"] = {**memory, **timing}
        print(f"1gpu: {out['1gpu']}", flush=True)
        for spec in args.caches:
            cached_params = dataclasses.replace(params, cache=CACHE_SPEC.parse(spec))
            pos_ids = latent_position_ids(rows, cols, config.max_latent_size)

            def run_cached(p, pos_ids=pos_ids, graphs=velocity.graphs):
                step_cache = make_step_cache(p.cache, rows * cols, lambda x: x)
                one_gpu = BlockVelocity(
                    model, contexts, pos_ids, MARKERS, graphs=graphs, step_cache=step_cache
                )
                hits: list[int] = []
                latents = denoise(
                    noise.to(device), one_gpu, p, step_cache=step_cache,
                    on_step=lambda n, total, cached, hits=hits: hits.append(n) if cached else None,
                )  # fmt: skip
                return latents, hits

            for _ in range(args.warmup):
                run_cached(cached_params)
            start = sync_time()
            latents, hits = run_cached(cached_params)
            denoised = sync_time()
            image = decode_image(ae, model.config, latents, params.height, params.width)
            done = sync_time()
            pixels = torch.tensor(list(image.getdata()), dtype=torch.float32)
            out[f"1gpu {spec}"] = {
                "denoise_s": denoised - start,
                "decode_s": done - denoised,
                "total_s": done - start,
                "psnr_db": psnr(pixels, reference_image),
                "cached_steps": len(hits),
            }
            print(f"1gpu {spec}: {out[f'1gpu {spec}']}", flush=True)
    if args.linear_precision == "fp8":
        # Every rank swaps its weights for e4m3 ones; rank 0 then runs the one-GPU path again,
        # against the bf16 run above, and the layouts below are compared with that FP8 run.
        if rank == 0 and velocity.graphs is not None:
            velocity.graphs.clear()  # its captures read the bf16 weights
        velocity = None
        use_fp8_linears(model)
        if rank == 0:
            memory = start_memory_phase()
            fp8_velocity = BlockVelocity(
                model, contexts, latent_position_ids(rows, cols, config.max_latent_size),
                MARKERS, graphs=None if args.eager else ForwardGraphs(),
            )  # fmt: skip
            fp8_first = first_forward(fp8_velocity, noise, device)
            latents, image, timing = one_gpu_generation(
                fp8_velocity, noise.to(device), ae, params, warmup, args.warmup
            )
            agreement = {
                **relative(fp8_first, reference_first),
                "latents_rel_l2": (
                    (latents - reference_latents).norm() / reference_latents.norm()
                ).item(),
                "psnr_db": psnr(image, reference_image),
            }
            out["1gpu fp8"] = {**timing, **agreement, **memory}
            print(f"1gpu fp8: {out['1gpu fp8']}", flush=True)
            reference_first, reference_image, reference_latents = fp8_first, image, latents
            if fp8_velocity.graphs is not None:
                fp8_velocity.graphs.clear()
            del fp8_velocity
    if args.attention_precision == "fp8" and rank == 0:
        # The one-GPU path again with FP8 attention, against the run above (bf16, or FP8
        # linears); the layouts below are compared with this one.
        if velocity is not None and velocity.graphs is not None:
            velocity.graphs.clear()
        velocity = None
        memory = start_memory_phase()
        attention_velocity = BlockVelocity(
            model, contexts, latent_position_ids(rows, cols, config.max_latent_size), MARKERS,
            attention=block_attention("fp8"), graphs=None if args.eager else ForwardGraphs(),
        )  # fmt: skip
        attention_first = first_forward(attention_velocity, noise, device)
        latents, image, timing = one_gpu_generation(
            attention_velocity, noise.to(device), ae, params, warmup, args.warmup
        )
        agreement = {
            **relative(attention_first, reference_first),
            "latents_rel_l2": (
                (latents - reference_latents).norm() / reference_latents.norm()
            ).item(),
            "psnr_db": psnr(image, reference_image),
        }
        out["1gpu fp8 attention"] = {**timing, **agreement, **memory}
        print(f"1gpu fp8 attention: {out['1gpu fp8 attention']}", flush=True)
        reference_first, reference_image = attention_first, image
        if attention_velocity.graphs is not None:
            attention_velocity.graphs.clear()
        del attention_velocity
    dist.barrier()

    for name in args.topologies:
        layout = TOPOLOGIES[name]
        if layout.world_size != world:
            continue
        mesh = ParallelMesh.build(
            layout, num_heads=config.llm.num_heads, num_kv_heads=config.llm.num_kv_heads
        )
        memory = start_memory_phase()
        runtime = RankRuntime(
            mesh, model, MARKERS, device, control, graphs=None if args.eager else ForwardGraphs(),
            attention_precision=args.attention_precision,
        )  # fmt: skip
        sharding = mesh.latent_sharding(rows * cols)
        velocity = ShardedVelocity(
            model, contexts, mesh, sharding, (rows, cols), MARKERS, graphs=runtime.graphs,
            attention_precision=args.attention_precision,
        )  # fmt: skip
        first = first_forward(velocity, sharding.shard(noise, dim=0), device)
        full_first = {b: sharding.gather(v, mesh.sp_group, dim=0) for b, v in first.items()}
        for _ in range(args.warmup):
            run_job(runtime, JobSpec(0, warmup), contexts)
        dist.barrier()
        start = sync_time()
        latents = run_job(runtime, JobSpec(1, params), contexts)
        denoised = sync_time()
        if rank == 0:
            image = decode_image(
                ae, model.config, latents.to(device), params.height, params.width,
                runtime.graphs,
            )  # fmt: skip
            done = sync_time()
        dist.barrier()
        step_ms = forward_ms(velocity, sharding.shard(noise, dim=0).to(device))
        if rank == 0:
            pixels = torch.tensor(list(image.getdata()), dtype=torch.float32)
            out[name] = {
                **relative(full_first, reference_first),
                "forward_ms": step_ms,
                "denoise_s": denoised - start,
                "decode_s": done - denoised,
                "total_s": done - start,
                "psnr_db": psnr(pixels, reference_image),
                **memory,
                **memory_gib(),
            }
            print(f"{name}: {out[name]}", flush=True)
        for spec in args.caches:
            cached_params = dataclasses.replace(params, cache=CACHE_SPEC.parse(spec))
            hits: list[int] = []
            for _ in range(args.warmup):
                run_job(runtime, JobSpec(0, cached_params), contexts)
            hit = hits.append
            dist.barrier()
            start = sync_time()
            latents = run_job(
                runtime, JobSpec(1, cached_params), contexts,
                on_progress=lambda n, total, cached, hit=hit: hit(n) if cached else None,
            )  # fmt: skip
            denoised = sync_time()
            if rank == 0:
                image = decode_image(
                    ae, model.config, latents.to(device), params.height, params.width,
                    runtime.graphs,
                )  # fmt: skip
                done = sync_time()
                pixels = torch.tensor(list(image.getdata()), dtype=torch.float32)
                out[f"{name} {spec}"] = {
                    "denoise_s": denoised - start,
                    "decode_s": done - denoised,
                    "total_s": done - start,
                    "psnr_db": psnr(pixels, reference_image),
                    "cached_steps": len(hits),
                }
                print(f"{name} {spec}: {out[f'{name} {spec}']}", flush=True)
            dist.barrier()
        if runtime.graphs is not None:
            # Captures hold NCCL work of this layout's groups; drop them before the groups go
            # (a 4-GPU run hung at exit when they were kept).
            runtime.graphs.clear()
        del velocity, runtime
        dist.barrier()
    if rank == 0:
        with open(results_path, "w") as f:
            json.dump(out, f)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--topologies", default="ulysses2,ring2,cfg2")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--cpu-smoke", action="store_true", help="a tiny model on CPU/gloo")
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--init", choices=INITS, default="unit", help="random weights' scale")
    parser.add_argument(
        "--linear-precision",
        choices=LINEAR_PRECISIONS,
        default="bf16",
        help="fp8: after the bf16 one-GPU run, quantize the decoder's linear layers (bagel.network.fp8), "
        "run one GPU again and compare with bf16; the layouts then run in FP8",
    )
    parser.add_argument(
        "--attention-precision",
        choices=ATTENTION_PRECISIONS,
        default="bf16",
        help="fp8: after the one-GPU run(s) above, run one GPU again with the generation block's "
        "attention in FP8 (bagel.kernels.fp8_attention) and compare; the layouts then run it too",
    )
    parser.add_argument(
        "--caches",
        default="",
        help="step-cache specs to time as well, separated by ';' "
        "(e.g. 'dbcache:fn=4,warmup=8,threshold=0.2;dbcache:fn=4,warmup=8,max_continuous=1,"
        "threshold=10' for the forced compute-one-reuse-one schedule)",
    )
    args = parser.parse_args()
    args.topologies = args.topologies.split(",")
    args.caches = [spec for spec in args.caches.split(";") if spec]
    for spec in args.caches:
        CACHE_SPEC.parse(spec)  # a bad spec fails here, before any GPU work
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        results_path = os.path.join(tmp, "results.json")
        mp.spawn(
            rank_main, args=(args.world, port, args, results_path), nprocs=args.world, join=True
        )
        with open(results_path) as f:
            results = json.load(f)
    name = "CPU (smoke)" if args.cpu_smoke else torch.cuda.get_device_name(0)
    kernels = "fused kernels" if fused.enabled() else "eager elementwise"
    precision = "fp32" if args.cpu_smoke else "bf16"
    if args.linear_precision == "fp8":
        precision += " (fp8 linear layers in the 'fp8' row and the layouts)"
    if args.attention_precision == "fp8":
        precision += " (fp8 attention in the 'fp8 attention' row and the layouts)"
    print(
        f"\n{args.size}x{args.size}, {args.steps} timesteps, CFG 4.0/1.5, {precision}, {name}, "
        f"{args.init} init, {kernels}"
    )
    print(
        f"{'config':<28} {'total s':>8} {'denoise s':>10} {'decode s':>9} {'1st fwd max':>12} "
        f"{'1st fwd L2':>11} {'PSNR dB':>8} {'fwd ms':>7} {'cached':>6} {'weights GiB':>12} "
        f"{'peak alloc GiB':>15} {'peak resv GiB':>14} {'latents L2':>11}"
    )
    nan = float("nan")
    for key, r in results.items():
        if "total_s" not in r:  # the noise-floor row: errors only
            print(
                f"{key:<28} {'':>8} {'':>10} {'':>9} {r['first_forward_rel_err']:>12.2e} "
                f"{r['first_forward_rel_l2']:>11.2e}"
            )
            continue
        print(
            f"{key:<28} {r['total_s']:>8.2f} {r['denoise_s']:>10.2f} {r['decode_s']:>9.3f} "
            f"{r.get('first_forward_rel_err', 0.0):>12.2e} {r.get('first_forward_rel_l2', 0.0):>11.2e} "
            f"{r.get('psnr_db', float('inf')):>8.1f} {r.get('forward_ms', nan):>7.1f} "
            f"{r.get('cached_steps', 0):>6} {r.get('weights_gib', nan):>12.2f} "
            f"{r.get('peak_allocated_gib', nan):>15.2f} {r.get('peak_reserved_gib', nan):>14.2f} "
            f"{r.get('latents_rel_l2', nan):>11.2e}"
        )
    phased = {k: r for k, r in results.items() if "denoise_peak_allocated_gib" in r}
    if phased:
        print(f"\n{'peak GiB by phase':<28} {'denoise alloc':>14} {'denoise resv':>13} "
              f"{'decode alloc':>13} {'decode resv':>12}")  # fmt: skip
        for key, r in phased.items():
            print(
                f"{key:<28} {r['denoise_peak_allocated_gib']:>14.2f} "
                f"{r['denoise_peak_reserved_gib']:>13.2f} {r['decode_peak_allocated_gib']:>13.2f} "
                f"{r['decode_peak_reserved_gib']:>12.2f}"
            )
    summary = {
        "device": name,
        "size": args.size,
        "steps": args.steps,
        "init": args.init,
        "linear_precision": args.linear_precision,
        "attention_precision": args.attention_precision,
        "fused_kernels": fused.enabled(),
        "results": results,
    }
    emit_json(summary, args.json)


if __name__ == "__main__":
    main()
