"""Text decoding through the prefill service: ms per token as a gRPC client sees it, for 1 and
more concurrent chat calls (`Prefill.Understand`, text only), against the service's own decode
time. Starts the prefill service on `--model` (no diffusion service: chat does not reach it).

    python -m benchmarks.chat_service --model DIR --device cuda [--clients 1,8] [--new-tokens 64]

Per call, the client's ms per token is (its last event - its first, less the service's prefill)
/ (tokens - 1); the service's is its `decode_ms` / (tokens - 1). Each row is the median over the calls of a round;
the first round at each concurrency is apart (captures).
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script: the repo root, not benchmarks/, heads the import path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import asyncio
import statistics
import tempfile
import time

from benchmarks._report import emit_json
from benchmarks.e2e_service import scrape, service_figures, start, stop, wait_until
from client.async_client import AsyncBagelClient
from diffusion_service.launch import free_port


async def one_call(address: str, new_tokens: int, seed: int) -> dict:
    """One chat call; its events' arrival times (random weights decode to text that often
    arrives only with the last event, so the client's figure spans the whole call: accepted to
    finished, less the service's prefill)."""
    async with AsyncBagelClient(address) as client:
        messages = [("user", f"Describe picture number {seed} in detail.")]
        stream = client.understand_stream(messages, max_new_tokens=new_tokens, timeout=300)
        first = last = 0.0
        finished = None
        async with stream as events:
            async for event in events:
                last = time.perf_counter()
                first = first or last
                if event.WhichOneof("event") == "finished":
                    finished = event.finished
    if finished is None:
        raise RuntimeError("the call ended without its final event")
    tokens = finished.usage.completion_tokens
    span = max(tokens - 1, 1)
    return {
        "tokens": tokens,
        "client_ms_per_token": ((last - first) * 1e3 - finished.prefill_ms) / span,
        "server_ms_per_token": finished.decode_ms / span,
    }


async def one_round(address: str, clients: int, new_tokens: int) -> list[dict]:
    return await asyncio.gather(*(one_call(address, new_tokens, i) for i in range(clients)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--clients", default="1,8", help="concurrent calls, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="per concurrency; the first apart")
    parser.add_argument("--load-timeout", type=float, default=600.0)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="chat-service-"))
    address, metrics = f"127.0.0.1:{free_port()}", free_port()
    log = logs / "prefill.log"
    proc = start(
        ["prefill_service", "--model", args.model, "--listen", address, "--device", args.device,
         "--diffusion", f"127.0.0.1:{free_port()}", "--metrics-port", str(metrics)],
        log,
    )  # fmt: skip
    rows = []
    try:
        wait_until(
            lambda: service_figures(scrape(metrics), "prefill")["load_s"] is not None,
            proc, log, args.load_timeout, "prefill service",
        )  # fmt: skip
        for clients in (int(c) for c in args.clients.split(",")):
            for round_ in range(args.rounds):
                calls = asyncio.run(one_round(address, clients, args.new_tokens))
                rows.append({
                    "clients": clients,
                    "round": "first" if round_ == 0 else "warm",
                    "tokens": statistics.median(c["tokens"] for c in calls),
                    "client_ms_per_token": statistics.median(
                        c["client_ms_per_token"] for c in calls
                    ),
                    "server_ms_per_token": statistics.median(
                        c["server_ms_per_token"] for c in calls
                    ),
                })  # fmt: skip
    finally:
        stop(proc)
    print(f"chat through the prefill service ({args.device}), log {log}")
    print("| clients | round | tokens per call | client ms/token | service decode ms/token |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['clients']} | {r['round']} | {r['tokens']:.0f} "
            f"| {r['client_ms_per_token']:.2f} | {r['server_ms_per_token']:.2f} |"
        )
    emit_json({"rows": rows}, args.json)


if __name__ == "__main__":
    main()
