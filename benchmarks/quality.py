"""Quality on the trained tiny checkpoint (examples/tiny_shapes): step-cache policies and SP layouts
against the uncached one-process image, on the 12 evaluation prompts.

For every cache spec: steps reused, PSNR and SSIM of the decoded image against the uncached one,
and how many prompts pass the pixel check (background and colour). For every layout (Ulysses 2,
Ring 2, KV gather 2, on real ranks: gloo on CPU, NCCL on GPUs): the same against one process.
Prints one table; the last line is one JSON object.

    python -m benchmarks.quality --device cpu
    python -m benchmarks.quality --device cuda --layouts ulysses2,ring2,kvgather2
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script: the repo root, not benchmarks/, heads the import path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import math
import os
import socket
import tempfile
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from bagel.pipeline import Pipeline
from benchmarks._report import emit_json
from diffusion_service.job import JobSpec
from diffusion_service.parallel.config import ParallelConfig
from diffusion_service.parallel.mesh import ParallelMesh
from diffusion_service.worker import RankRuntime, run_job
from examples.tiny_shapes.check import EVAL_PROMPTS, check_prompt
from serving.params import CACHE_SPEC, GenerationParams
from step_cache.collective import make_step_cache

CHECKPOINT = Path(__file__).resolve().parents[1] / "examples" / "tiny_shapes" / "checkpoint"
CACHES = (
    "teacache:threshold=0.1;teacache:threshold=0.3;teacache:threshold=0.6;"
    "dbcache:fn=1,warmup=8,threshold=0.05;dbcache:fn=1,warmup=8,threshold=0.1;"
    "dbcache:fn=1,warmup=8,threshold=0.2;"
    "dbcache:fn=1,warmup=8,threshold=0.1+taylorseer:order=1;"
    "dbcache:fn=1,warmup=8,max_continuous=1,threshold=10"
)
LAYOUTS = {
    "ulysses2": ParallelConfig(ulysses=2),
    "ring2": ParallelConfig(ring=2),
    "kvgather2": ParallelConfig(kv_gather=2),
}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM over the RGB channels, 11x11 Gaussian window (sigma 1.5), as Wang et al. 2004."""
    x = torch.tensor(a, dtype=torch.float64).permute(2, 0, 1)[:, None]
    y = torch.tensor(b, dtype=torch.float64).permute(2, 0, 1)[:, None]
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]

    def blur(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, window)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def params_for(prompt, steps: int) -> GenerationParams:
    return GenerationParams(height=128, width=128, num_timesteps=steps, seed=prompt.seed)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def compare(images: list[np.ndarray], reference: list[np.ndarray]) -> dict:
    """The worst PSNR and SSIM over the prompts, how many images are identical, and how many pass
    the pixel check."""
    pairs = list(zip(images, reference, strict=True))
    passed = sum(check_prompt(im, p).passed for im, p in zip(images, EVAL_PROMPTS, strict=True))
    return {
        "psnr_db_min": min(psnr(a, b) for a, b in pairs),
        "ssim_min": min(ssim(a, b) for a, b in pairs),
        "identical": sum(bool(np.array_equal(a, b)) for a, b in pairs),
        "passed": passed,
    }


def single_process(pipeline: Pipeline, spec: str | None, steps: int) -> tuple[list, float]:
    """The 12 images with the cache `spec` (None: uncached), and the mean steps reused."""
    images, reused = [], []
    for prompt in EVAL_PROMPTS:
        params = params_for(prompt, steps)
        contexts = pipeline.prefill(prompt.text)
        policy = CACHE_SPEC.parse(spec) if spec else None
        rows, cols = pipeline.config.latent_grid(params.height, params.width)
        cache = make_step_cache(policy, rows * cols, lambda x: x)
        hits: list[int] = []
        latents = pipeline.denoise(
            contexts, params, step_cache=cache,
            on_step=lambda n, total, cached, hits=hits: hits.append(n) if cached else None,
        )  # fmt: skip
        images.append(pixels(pipeline.decode(latents, params.height, params.width)))
        reused.append(len(hits))
    return images, float(np.mean(reused))


def layout_rank(rank: int, world: int, port: int, name: str, args, out_path: str) -> None:
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
        rank=rank, world_size=world, timeout=timedelta(minutes=5),
    )  # fmt: skip
    control = dist.new_group(backend="gloo")
    pipeline = Pipeline(CHECKPOINT, args.device)
    llm = pipeline.config.llm
    mesh = ParallelMesh.build(LAYOUTS[name], num_heads=llm.num_heads, num_kv_heads=llm.num_kv_heads)
    runtime = RankRuntime(mesh, pipeline.model, pipeline.marker_ids, device, control)
    images = []
    for prompt in EVAL_PROMPTS:
        params = params_for(prompt, args.steps)
        latents = run_job(runtime, JobSpec(0, params), pipeline.prefill(prompt.text))
        if rank == 0:
            images.append(pixels(pipeline.decode(latents.to(device), 128, 128)))
    if rank == 0:
        np.save(out_path, np.stack(images))
    dist.destroy_process_group()


def run_layout(name: str, args) -> list[np.ndarray]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "images.npy")
        world = LAYOUTS[name].world_size
        mp.spawn(layout_rank, args=(world, port, name, args, out), nprocs=world, join=True)
        return list(np.load(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=50, help="timesteps per image")
    parser.add_argument("--caches", default=CACHES, help="cache specs separated by ';'")
    parser.add_argument("--layouts", default="", help=f"of {', '.join(LAYOUTS)}, comma-separated")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    caches = [c for c in args.caches.split(";") if c]
    layouts = [name for name in args.layouts.split(",") if name]
    for spec in caches:
        CACHE_SPEC.parse(spec)  # a bad spec fails before any work
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pipeline = Pipeline(CHECKPOINT, args.device)
    reference, _ = single_process(pipeline, None, args.steps)
    rows = {"none (1 process)": {**compare(reference, reference), "reused": 0.0}}
    for spec in caches:
        images, reused = single_process(pipeline, spec, args.steps)
        rows[spec] = {**compare(images, reference), "reused": reused}
    for name in layouts:
        rows[name] = {**compare(run_layout(name, args), reference), "reused": 0.0}
    card = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    precision = "bf16" if args.device == "cuda" else "fp32"
    print(
        f"\ntrained tiny checkpoint, 12 prompts, 128x128, {args.steps} timesteps, {card}, {precision}"
    )
    print(
        f"{'run':<58} {'reused':>7} {'min PSNR dB':>12} {'min SSIM':>9} {'identical':>10} "
        f"{'passed':>7}"
    )
    for name, r in rows.items():
        print(
            f"{name:<58} {r['reused']:>7.1f} {r['psnr_db_min']:>12.1f} {r['ssim_min']:>9.4f} "
            f"{r['identical']:>7}/12 {r['passed']:>4}/12"
        )
    summary = {"device": card, "precision": precision, "steps": args.steps, "results": rows}
    emit_json(summary, args.json)


if __name__ == "__main__":
    main()
