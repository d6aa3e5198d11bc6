"""End to end through both real services: the prefill service once, the diffusion service once
per (topology, linear precision), requests from a gRPC client; prints load times, peak memory and
per-phase latencies.

    python -m benchmarks.e2e_service --model DIR --device cuda --size 1024 --steps 50 \\
        --topologies "" "--ulysses 2" "--ring 2" "--cfg-parallel 2" "--kv-gather 2" \\
        --linear-precision bf16 fp8 --json e2e.json

For each run: each service's model load time (`bagel_<service>_model_load_seconds`: from the start
of loading to serving; the diffusion service's includes starting its ranks), the peak GPU memory
of every diffusion rank and of the prefill service, reserved and allocated
(`bagel_<service>_peak_memory_bytes`; n/a on CPU), and each request's phases as the client
receives them: prefill, KV send, receive, broadcast, denoise, decode, and the client's own wall
time (total). The first request is reported apart (CUDA-graph capture, Triton compiles); the
others are averaged. The prefill service shares the first GPU with diffusion rank 0.

`--compare` then generates the same image in this process and reports each run's PSNR against
it; it runs after every service has stopped, so two copies of the weights never share a GPU.
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
import statistics
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from client import BagelClient
from diffusion_service.launch import free_port, validate_settings
from diffusion_service.parallel.config import ParallelConfig
from diffusion_service.settings import ServiceSettings, parse_settings
from serving.params import GenerationParams

PROMPT = "A cute cat"
EDIT_PROMPT = "make the sky purple"
SEED = 52
# The client's view of one request, in ms: the services' Timings event plus its own wall time.
PHASES = (
    "prefill_ms",
    "kv_send_ms",
    "receive_ms",
    "broadcast_ms",
    "denoise_ms",
    "decode_ms",
    "client_ms",
)
PRECISIONS = ("bf16", "fp8")
GIB = 1024**3


@dataclass(frozen=True)
class Run:
    """One diffusion service configuration: its topology flags and linear precision (None: the
    flag is not passed, so the service's default, bf16)."""

    topology: str
    precision: str | None

    def settings(self, device: str) -> ServiceSettings:
        """The diffusion service's settings from these flags on `device` (a `--preset` resolved
        as the service resolves it on this machine)."""
        return parse_settings(["--model", "-", "--device", device, *self.diffusion_flags()])

    def parallel(self, device: str) -> ParallelConfig:
        return self.settings(device).parallel

    def precision_name(self, device: str) -> str:
        """The linear layers' precision: fp8 where the flags (or the preset) ask, else the
        service's default dtype."""
        if self.settings(device).linear_precision == "fp8":
            return "fp8"
        return self.precision or ("bf16" if device == "cuda" else "fp32")

    @property
    def slug(self) -> str:
        words = shlex.split(self.topology)
        flags = "".join(w.lstrip("-").replace("-", "") for w in words) or "single"
        return f"{flags}-{self.precision or 'default'}"

    def diffusion_flags(self) -> list[str]:
        flags = shlex.split(self.topology)
        return flags + (["--linear-precision", self.precision] if self.precision else [])


def layout_name(parallel: ParallelConfig, device: str) -> str:
    """'Ulysses 2', 'KV gather 2 x Ring 2', ...; '1 GPU' (or '1 rank' off CUDA)."""
    parts = [
        f"{name} {degree}"
        for name, degree in (
            ("Ulysses", parallel.ulysses),
            ("KV gather", parallel.kv_gather),
            ("Ring", parallel.ring),
            ("CFG", parallel.cfg_parallel),
        )
        if degree > 1
    ]
    return " x ".join(parts) or ("1 GPU" if device == "cuda" else "1 rank")


# ---- the services ------------------------------------------------------------------------------


def start(args: list[str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "w")  # noqa: SIM115 - lives as long as the process
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT, env=env
    )


def stop(proc: subprocess.Popen, timeout: float = 120) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class ServiceFailed(RuntimeError):
    pass


def wait_until(ready, proc: subprocess.Popen, log_path: Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceFailed(f"{what}: the service exited:\n{tail(log_path)}")
        try:
            if ready():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.3)
    raise ServiceFailed(f"{what}: not ready after {timeout:.0f} s:\n{tail(log_path)}")


def serving(address: str) -> bool:
    with BagelClient(address) as client:
        return client.health(timeout=1.0) == "SERVING"


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The samples of a service's /metrics page, by sample name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
        return parse_metrics(page.read().decode())


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def service_figures(samples: dict, service: str) -> dict:
    """Model load seconds (None until loaded) and peak memory per rank in GiB ([] on CPU)."""
    load = [v for _, v in samples.get(f"bagel_{service}_model_load_seconds", [])]
    peaks: dict[int, dict[str, float]] = {}
    for labels, value in samples.get(f"bagel_{service}_peak_memory_bytes", []):
        peaks.setdefault(int(labels["rank"]), {})[labels["kind"]] = value / GIB
    return {
        "load_s": load[0] if load and load[0] > 0 else None,
        "peak_gib": [{"rank": rank, **peaks[rank]} for rank in sorted(peaks)],
    }


# ---- the figures -------------------------------------------------------------------------------


def edit_input(size: int) -> bytes:
    """A deterministic `size x size` input for edit runs: smooth colour ramps with noise, so the
    PNG is neither trivial nor incompressible."""
    ramp = np.linspace(0, 255, size)
    noise = np.random.default_rng(SEED).integers(0, 32, (size, size, 3))
    pixels = np.stack(
        [np.broadcast_to(ramp, (size, size)), np.broadcast_to(ramp[:, None], (size, size)),
         np.full((size, size), 128.0)], axis=-1,
    ) + noise  # fmt: skip
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def kv_bytes_sent(samples: dict) -> float:
    return sum(v for _, v in samples.get("bagel_prefill_kv_bytes_sent_total", []))


def summarise(requests: Sequence[dict[str, float]]) -> dict:
    """The first request apart; the mean of the others per phase (None with one request)."""
    warm = requests[1:]
    mean = None
    if warm:
        mean = {
            k: statistics.fmean(r[k] for r in warm) for k in PHASES if all(k in r for r in warm)
        }
    return {"first": dict(requests[0]), "warm": mean, "warm_requests": len(warm)}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _peaks(peaks: Sequence[dict]) -> str:
    if not peaks:
        return "n/a"
    return " ".join(
        f"{p['rank']}:{p.get('reserved', 0):.1f}/{p.get('allocated', 0):.1f}" for p in peaks
    )


def table(rows: Sequence[dict]) -> str:
    """One line for each run's first request and one for its warm mean."""
    compare = any("psnr_db" in r for r in rows)
    head = (
        f"{'layout':<22} {'prec':<5} {'load s pf/df':>13} {'pf GiB':>9} "
        f"{'peak GiB per rank (res/alloc)':<30} {'KV MB':>8} {'request':<8}"
        + "".join(f"{p.removesuffix('_ms').replace('client', 'total'):>10}" for p in PHASES)
        + (f" {'PSNR dB':>8}" if compare else "")
    )
    lines = [head]
    for row in rows:
        prefix = f"{row['layout']:<22} {row['precision']:<5}"
        if "error" in row:
            lines.append(f"{prefix} failed: {row['error'].splitlines()[0]}")
            continue
        load = f"{_ms(row['load_s']['prefill'])}/{_ms(row['load_s']['diffusion'])}"
        prefill_peak = _peaks(row["peak_gib"]["prefill"]).removeprefix("0:")
        peaks = _peaks(row["peak_gib"]["diffusion"])
        summary = row["summary"]
        cases = [("first", summary["first"])]
        if summary["warm"] is not None:
            cases.append((f"warm x{summary['warm_requests']}", summary["warm"]))
        kv = row.get("kv_mb_per_request")
        run_columns = f"{prefix} {load:>13} {prefill_peak:>9} {peaks:<30} {_ms(kv):>8}"
        for i, (name, phases) in enumerate(cases):
            start = run_columns if i == 0 else " " * len(run_columns)
            psnr_text = ""
            if compare and i == 0:
                db = row.get("psnr_db")
                same = row.get("max_pixel_diff") == 0
                psnr_text = f" {'identical' if same else _ms(db):>8}"
            lines.append(
                f"{start} {name:<8}"
                + "".join(f"{_ms(phases.get(p)):>10}" for p in PHASES)
                + psnr_text
            )
    return "\n".join(lines)


# ---- the benchmark -----------------------------------------------------------------------------


def device_name(device: str) -> str:
    if device != "cuda":
        return "CPU"
    try:
        names = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.split("\n")
        return f"{len([n for n in names if n])} x {names[0].strip()}"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "CUDA"


@dataclass
class Bench:
    args: argparse.Namespace
    params: GenerationParams
    logs: Path
    prefill_address: str
    diffusion_address: str
    prefill_metrics_port: int
    prefill: subprocess.Popen | None = None
    prefill_load_s: float | None = None

    @property
    def prefill_log(self) -> Path:
        return self.logs / "prefill.log"

    def start_prefill(self) -> None:
        a = self.args
        self.prefill = start(
            ["prefill_service", "--model", a.model, "--listen", self.prefill_address,
             "--diffusion", self.diffusion_address, "--device", a.device,
             "--metrics-port", str(self.prefill_metrics_port)],
            self.prefill_log,
        )  # fmt: skip

        def loaded() -> bool:
            figures = service_figures(scrape(self.prefill_metrics_port), "prefill")
            self.prefill_load_s = figures["load_s"]
            return self.prefill_load_s is not None

        # The model alone, before any diffusion service competes for the disk and the GPU.
        wait_until(loaded, self.prefill, self.prefill_log, a.load_timeout, "prefill service")
        print(f"prefill service loaded in {self.prefill_load_s:.1f} s", flush=True)

    def run(self, run: Run) -> dict:
        a = self.args
        row = {
            "layout": layout_name(run.parallel(a.device), a.device),
            "topology": run.topology,
            "precision": run.precision_name(a.device),
            "world": run.parallel(a.device).world_size,
        }
        metrics_port = free_port()
        log_path = self.logs / f"diffusion-{run.slug}.log"
        started = time.perf_counter()
        proc = start(
            ["diffusion_service", "--model", a.model, "--listen", self.diffusion_address,
             "--device", a.device, "--metrics-port", str(metrics_port), *run.diffusion_flags()],
            log_path,
        )  # fmt: skip
        requests: list[dict[str, float]] = []
        try:
            wait_until(
                lambda: serving(self.diffusion_address),
                proc,
                log_path,
                a.load_timeout,
                f"diffusion service {run.slug}",
            )
            ready_s = time.perf_counter() - started
            # The prefill service checks the diffusion service's health once a second.
            wait_until(
                lambda: serving(self.prefill_address), self.prefill, self.prefill_log, 30, "prefill"
            )
            kv_before = kv_bytes_sent(scrape(self.prefill_metrics_port))
            source = edit_input(a.edit) if a.edit else b""  # encoded once, outside the timing
            with BagelClient(self.prefill_address, timeout=a.request_timeout) as client:
                for _ in range(a.requests):
                    t0 = time.perf_counter()
                    if a.edit:  # the output size defaults to the input's
                        result = client.edit(
                            source,
                            EDIT_PROMPT,
                            num_timesteps=self.params.num_timesteps,
                            seed=self.params.seed,
                        )
                    else:
                        result = client.generate(
                            PROMPT,
                            height=self.params.height,
                            width=self.params.width,
                            num_timesteps=self.params.num_timesteps,
                            seed=self.params.seed,
                        )
                    client_ms = (time.perf_counter() - t0) * 1e3
                    requests.append({**result.timings, "client_ms": client_ms})
                    print(f"  {run.slug}: request {len(requests)}: {client_ms:.0f} ms", flush=True)
            (self.logs / f"{run.slug}.png").write_bytes(result.png)
            diffusion = service_figures(scrape(metrics_port), "diffusion")
            prefill_samples = scrape(self.prefill_metrics_port)
            prefill = service_figures(prefill_samples, "prefill")
            kv_mb = (kv_bytes_sent(prefill_samples) - kv_before) / len(requests) / 1e6
        except (ServiceFailed, grpc.RpcError, OSError) as e:
            message = e.details() if isinstance(e, grpc.RpcError) else str(e)
            print(f"  {run.slug} failed: {message}", flush=True)
            return {**row, "error": message, "log": str(log_path)}
        finally:
            stop(proc)
        return {
            **row,
            "load_s": {"prefill": self.prefill_load_s, "diffusion": diffusion["load_s"]},
            "diffusion_ready_s": ready_s,
            "peak_gib": {"diffusion": diffusion["peak_gib"], "prefill": prefill["peak_gib"]},
            "kv_mb_per_request": kv_mb,
            "summary": summarise(requests),
            "requests": requests,
            "image": str(self.logs / f"{run.slug}.png"),
            "log": str(log_path),
        }


def compare(rows: list[dict], args: argparse.Namespace, params: GenerationParams) -> None:
    """PSNR of each run's image against the in-process pipeline (bf16 linear layers)."""
    from bagel.pipeline import Pipeline

    reference = np.asarray(Pipeline(args.model, args.device).generate(PROMPT, params).image)
    for row in rows:
        if "image" in row:
            served = np.asarray(
                Image.open(io.BytesIO(Path(row["image"]).read_bytes())).convert("RGB")
            )
            db = psnr(served, reference)
            row["psnr_db"] = None if db == float("inf") else db  # JSON has no Infinity
            row["max_pixel_diff"] = int(np.abs(served.astype(int) - reference).max())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--topologies",
        nargs="+",
        default=None,
        metavar="FLAGS",
        help='diffusion-service topology flags, one run each, e.g. "" "--ulysses 2" "--ring 2"',
    )
    parser.add_argument("--topology", default="", help="one topology (when --topologies is unset)")
    parser.add_argument(
        "--linear-precision",
        nargs="+",
        choices=PRECISIONS,
        default=None,
        help="passed to the diffusion service, one run each (default: not passed, i.e. bf16)",
    )
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--requests", type=int, default=3, help="per run; the first is apart")
    parser.add_argument(
        "--edit",
        type=int,
        default=None,
        metavar="SIZE",
        help="image editing: each request edits a SIZE x SIZE input (the output takes the input's "
        "resized size; --size is then unused)",
    )
    parser.add_argument("--compare", action="store_true", help="PSNR against the in-process run")
    parser.add_argument("--json", default=None, help="write the results here (after each run)")
    parser.add_argument("--logs", default=".", help="directory for service logs and images")
    parser.add_argument("--load-timeout", type=float, default=900.0)
    parser.add_argument("--request-timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    if args.edit is not None and args.compare:
        parser.error("--compare compares text-to-image runs only")
    return args


def main() -> None:
    args = parse_args()
    # `timeout` or a supervisor stopping us: unwind, so that the services are stopped too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    params = GenerationParams(
        height=args.size, width=args.size, num_timesteps=args.steps, seed=SEED
    )
    topologies = args.topologies if args.topologies is not None else [args.topology]
    runs = [Run(t, p) for t in topologies for p in (args.linear_precision or [None])]
    for run in runs:  # a bad flag or topology fails here, before any service starts
        try:
            validate_settings(
                parse_settings(
                    ["--model", args.model, "--device", args.device, *run.diffusion_flags()]
                )
            )
        except ValueError as e:
            raise SystemExit(f"topology {run.topology!r}: {e}") from None
    if args.device == "cuda":
        import torch

        visible = torch.cuda.device_count()
        too_big = [r.topology for r in runs if r.parallel("cuda").world_size > visible]
        if too_big:
            raise SystemExit(f"topologies {too_big} need more than the {visible} visible GPUs")
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    bench = Bench(
        args,
        params,
        logs,
        prefill_address=f"127.0.0.1:{free_port()}",
        diffusion_address=f"127.0.0.1:{free_port()}",
        prefill_metrics_port=free_port(),
    )
    result = {
        "settings": {
            "size": args.size,
            "edit_input": args.edit,
            "steps": args.steps,
            "requests": args.requests,
            "prompt": PROMPT,
            "seed": SEED,
            "device": args.device,
            "model": args.model,
        },
        "card": device_name(args.device),
        "date": time.strftime("%Y-%m-%d"),
        "rows": [],
    }

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))

    try:
        bench.start_prefill()
        for run in runs:
            print(f"run {run.slug}: starting the diffusion service", flush=True)
            result["rows"].append(bench.run(run))
            save()
    finally:
        if bench.prefill is not None:
            stop(bench.prefill)
    if args.compare:
        compare(result["rows"], args, params)
        save()
    task = f"edit of a {args.edit}x{args.edit} input" if args.edit else f"{args.size}x{args.size}"
    print(
        f"\n{task}, {args.steps} timesteps, {result['card']}, "
        f"{args.requests} requests per run (first apart, the rest averaged); times in ms"
    )
    print(table(result["rows"]))
    if not args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
