"""The HTTP gateway's added latency: the same requests through the gateway (HTTP, JSON, base64)
and straight to the prefill service with the gRPC client, on the same services, interleaved so
that drift hits both alike; prints a table and one JSON line.

    python -m benchmarks.http_gateway --model examples/tiny_shapes/checkpoint --size 128 \\
        --steps 4 --requests 40

starts the diffusion service, the prefill service and the gateway on free loopback ports
(`--device cuda` for GPUs). `--prefill HOST:PORT --gateway HOST:PORT` measures running ones.

Both sides end with the PNG's bytes in hand: the gRPC side reads the stream's events (no PNG
decode), the HTTP side reads the answer, parses its JSON and decodes the base64. The gateway's
added latency is the difference of the medians; the base64 line is the encoding of the same PNG
alone (the gateway pays it, the contract's target excludes it).
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script: the repo root, not benchmarks/, heads the import path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import base64
import http.client
import json
import os
import statistics
import subprocess
import tempfile
import time
import urllib.request
from contextlib import ExitStack

from benchmarks._report import emit_json
from client import BagelClient

PROMPT = "a red circle on a white background"
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """`python -m MODULE ARGS` with its log in a temporary file; stopped on exit."""

    def __init__(self, module: str, args: list[str]) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix=f"{module}-", suffix=".log", delete=False)  # noqa: SIM115
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise SystemExit(f"{self.proc.args[2]} exited:\n{Path(self.log.name).read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def wait_until(ready, processes: list[Process], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        for p in processes:
            p.check()
        if time.monotonic() > deadline:
            raise SystemExit("the services did not get ready in time")
        time.sleep(0.2)


def gateway_ready(address: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{address}/ready", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def start_services(stack: ExitStack, model: str, device: str) -> tuple[str, str]:
    diffusion, prefill, gateway = (f"127.0.0.1:{free_port()}" for _ in range(3))
    processes = [
        Process(
            "diffusion_service",
            ["--model", model, "--listen", diffusion, "--device", device],
        ),
        Process(
            "prefill_service",
            ["--model", model, "--listen", prefill, "--diffusion", diffusion, "--device", device],
        ),
        Process("gateway", ["--listen", gateway, "--prefill", prefill]),
    ]
    for p in processes:
        stack.callback(p.stop)
    wait_until(lambda: gateway_ready(gateway), processes)
    return prefill, gateway


def grpc_png(client: BagelClient, params: dict) -> bytes:
    png = b""
    with client.stream(PROMPT, **params) as events:
        for event in events:
            if event.WhichOneof("event") == "image":
                png = event.image.png
    return png


def http_png(connection: http.client.HTTPConnection, body: bytes) -> bytes:
    connection.request("POST", "/v1/images/generations", body, {"Content-Type": "application/json"})
    reply = connection.getresponse()
    data = reply.read()
    if reply.status != 200:
        raise SystemExit(f"the gateway answered {reply.status}: {data[:500]!r}")
    return base64.b64decode(json.loads(data)["data"][0]["b64_json"])


def measure(prefill: str, gateway: str, size: int, steps: int, requests: int) -> dict:
    params = {"height": size, "width": size, "num_timesteps": steps, "seed": 7}
    body = json.dumps(
        {"prompt": PROMPT, "size": f"{size}x{size}", "num_timesteps": steps, "seed": 7}
    ).encode()
    host, port = gateway.rsplit(":", 1)
    grpc_ms: list[float] = []
    http_ms: list[float] = []
    with BagelClient(prefill, timeout=600) as client:
        connection = http.client.HTTPConnection(host, int(port), timeout=600)
        reference = grpc_png(client, params)  # warm-up, both paths
        if http_png(connection, body) != reference:
            raise SystemExit("the gateway's PNG differs from the gRPC client's")
        for i in range(requests):
            order = ("grpc", "http") if i % 2 == 0 else ("http", "grpc")
            for side in order:
                started = time.perf_counter()
                if side == "grpc":
                    grpc_png(client, params)
                    grpc_ms.append((time.perf_counter() - started) * 1000)
                else:
                    http_png(connection, body)
                    http_ms.append((time.perf_counter() - started) * 1000)
        connection.close()
    started = time.perf_counter()
    for _ in range(20):
        base64.b64encode(reference)
    b64_ms = (time.perf_counter() - started) * 1000 / 20
    g, h = statistics.median(grpc_ms), statistics.median(http_ms)
    return {
        "size": size,
        "steps": steps,
        "requests": requests,
        "png_bytes": len(reference),
        "grpc_median_ms": g,
        "http_median_ms": h,
        "grpc_p90_ms": statistics.quantiles(grpc_ms, n=10)[-1],
        "http_p90_ms": statistics.quantiles(http_ms, n=10)[-1],
        "added_ms": h - g,
        "base64_ms": b64_ms,
        "added_minus_base64_ms": h - g - b64_ms,
    }


def table(r: dict) -> str:
    rows = [
        ("gRPC client, median", r["grpc_median_ms"]),
        ("gRPC client, p90", r["grpc_p90_ms"]),
        ("HTTP gateway, median", r["http_median_ms"]),
        ("HTTP gateway, p90", r["http_p90_ms"]),
        ("added by the gateway (medians)", r["added_ms"]),
        (f"base64 of the PNG ({r['png_bytes']} B)", r["base64_ms"]),
        ("added, less base64", r["added_minus_base64_ms"]),
    ]
    head = f"{r['size']}x{r['size']}, {r['steps']} timesteps, {r['requests']} requests per side"
    lines = [head, f"{'':<36}{'ms':>10}"]
    lines += [f"{name:<36}{value:>10.2f}" for name, value in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.http_gateway",
        description="The HTTP gateway's added latency against the gRPC client.",
    )
    parser.add_argument("--model", default="examples/tiny_shapes/checkpoint")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="timesteps per request")
    parser.add_argument("--requests", type=int, default=40, help="per side")
    parser.add_argument("--prefill", help="a running prefill service (with --gateway)")
    parser.add_argument("--gateway", help="a running gateway in front of --prefill")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args(argv)
    if (args.prefill is None) != (args.gateway is None):
        parser.error("--prefill and --gateway go together")
    with ExitStack() as stack:
        if args.prefill is None:
            prefill, gateway = start_services(stack, args.model, args.device)
        else:
            prefill, gateway = args.prefill, args.gateway
        result = measure(prefill, gateway, args.size, args.steps, args.requests)
    print(table(result))
    emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
