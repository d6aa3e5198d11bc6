"""End to end through both real services: start the diffusion service (any topology) and the
prefill service, send requests with the client, print the latency of each phase, and compare the
image with the in-process pipeline on the same device.

    python -m benchmarks.e2e_service --model out/tiny-bagel --device cuda --topology "--ulysses 2"
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script: the repo root, not benchmarks/, heads the import path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import io
import json
import os
import shlex
import signal
import subprocess
import time

import numpy as np
from PIL import Image

from bagel.pipeline import Pipeline
from client import BagelClient
from diffusion_service.world import free_port
from serving.params import GenerationParams

PROMPT = "A cute cat"


def start(args: list[str], log_path: str) -> subprocess.Popen:
    log = open(log_path, "w")  # noqa: SIM115 - lives as long as the process
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT, env=env
    )


def wait_serving(address: str, proc: subprocess.Popen, log_path: str, timeout: float = 300) -> None:
    client = BagelClient(address)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"service exited:\n{read(log_path)}")
        try:
            if client.health(timeout=1.0) == "SERVING":
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.3)
    raise SystemExit(f"{address} not serving after {timeout} s:\n{read(log_path)}")


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--topology", default="", help='e.g. "--ulysses 2 --ring 2"')
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--logs", default=".")
    args = parser.parse_args()
    params = GenerationParams(height=args.size, width=args.size, num_timesteps=args.steps, seed=52)

    diffusion, prefill = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    logs = (os.path.join(args.logs, "diffusion.log"), os.path.join(args.logs, "prefill.log"))
    procs = [
        start(
            ["diffusion_service", "--model", args.model, "--listen", diffusion, "--device", args.device,
             *shlex.split(args.topology)],
            logs[0],
        ),
        start(
            ["prefill_service", "--model", args.model, "--listen", prefill, "--diffusion", diffusion,
             "--device", args.device],
            logs[1],
        ),
    ]  # fmt: skip
    rows = []
    try:
        wait_serving(diffusion, procs[0], logs[0])
        wait_serving(prefill, procs[1], logs[1])
        client = BagelClient(prefill, timeout=600)
        for i in range(args.requests):
            start_t = time.perf_counter()
            result = client.generate(
                PROMPT,
                height=params.height,
                width=params.width,
                num_timesteps=params.num_timesteps,
                seed=params.seed,
            )
            rows.append(
                {"request": i, "client_ms": (time.perf_counter() - start_t) * 1e3, **result.timings}
            )
            png = result.png
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(60)
    reference = np.asarray(Pipeline(args.model, args.device).generate(PROMPT, params).image)
    served = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    quality = {
        "psnr_vs_in_process_db": psnr(served, reference),
        "max_pixel_diff": int(np.abs(served.astype(int) - reference).max()),
    }
    keys = [k for k in rows[0] if k != "request"]
    print(
        f"\n{args.size}x{args.size}, {args.steps} timesteps, device {args.device}, topology '{args.topology or '1 rank'}'"
    )
    print(" ".join(f"{k:>12}" for k in ["request", *keys]))
    for r in rows:
        print(" ".join([f"{r['request']:>12}"] + [f"{r[k]:>12.1f}" for k in keys]))
    print(f"served image vs in-process pipeline: {quality}")
    print(json.dumps({"rows": rows, **quality}))


if __name__ == "__main__":
    main()
