"""Where a text-to-image prefill's time goes: the prefill service's KV source (`LanguageModelKV`)
over one prompt and its CFG contexts, layer by layer, in process and as the service runs it.

Times (median of `--repeats`) the layers alone and the layers with each layer's K/V copied to the
host as the KV encoder does, each on this thread and on a new thread per pass; then a request's
whole frames (layers, copies, encoding: `prefill.request_frames`) on this thread, on a new thread
per pass, and as the service computes them: on its long-lived KV-prefill worker
(`prefill_service.kv_worker`), read on a new thread per pass as gRPC's per-call request thread
reads them. With `--contend`, also while another Python thread keeps asking for the GIL, at the
interpreter's default switch interval and at a shorter one (slow: seconds). Then it runs one pass
under `torch.cuda.set_sync_debug_mode` and lists the operations that wait for the GPU: each such
wait hands the GIL to any other thread that wants it, and taking it back can cost up to one
switch interval (5 ms by default).

    python -m benchmarks.prefill_latency --model DIR [--device cuda] [--repeats 10] [--contend]
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script: the repo root, not benchmarks/, heads the import path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import statistics
import threading
import time
import traceback
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from benchmarks._report import emit_json
from prefill_service.kv_worker import KVWorker
from prefill_service.prefill import LanguageModelKV, PrefillStats, request_frames
from serving.params import GenerationParams

REPO = str(Path(__file__).resolve().parents[1])


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def one_pass(source: LanguageModelKV, prompt: str, params, to_host: bool) -> None:
    for layer in source.plan(prompt, params).compute():
        if to_host:
            for k, v in layer:
                k.cpu(), v.cpu()


def frames(source: LanguageModelKV, prompt: str, params) -> Iterator[list[bytes]]:
    """One request's frame batches, lazily, as the servicer builds them."""
    planned = source.plan(prompt, params)
    return request_frames(source, planned, request_id="bench", params=params, stats=PrefillStats())


def drain(batches) -> None:
    deque(batches, maxlen=0)


def median_ms(fn: Callable[[], None], device: str, repeats: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def on_new_thread(fn: Callable[[], None]) -> None:
    thread = threading.Thread(target=fn)
    thread.start()
    thread.join()


@contextmanager
def gil_contender() -> Iterator[None]:
    """A thread that runs Python bytecode (never blocking) for as long as the block runs."""
    stop = threading.Event()

    def spin() -> None:
        n = 0
        while not stop.is_set():
            n += 1

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def synchronizing_ops(fn: Callable[[], None]) -> Counter:
    """Where `fn` waits for the GPU: the innermost frame of ours for each sync warning."""
    found: Counter = Counter()
    original = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        # The innermost frame in the repo's own packages: the call that waited.
        ours = [
            f
            for f in traceback.extract_stack()
            if f.filename.startswith(REPO) and not f.filename.startswith(f"{REPO}/benchmarks/")
        ]
        where = ours[-1] if ours else traceback.extract_stack()[-2]
        found[f"{Path(where.filename).name}:{where.lineno} {where.line}"] += 1

    warnings.showwarning = record
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = original
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompt", default="A cute cat")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--contend", action="store_true", help="also time it beside a thread that spins in Python"
    )
    args = parser.parse_args()

    started = time.perf_counter()
    source = LanguageModelKV(args.model, device=args.device, image_input=False)
    load_s = time.perf_counter() - started
    params = GenerationParams(height=1024, width=1024, num_timesteps=50, seed=1)
    planned = source.plan(args.prompt, params)
    tokens = {int(c.kind): c.num_tokens for c in planned.contexts}

    rows = {}
    default_interval = sys.getswitchinterval()
    for to_host in (False, True):
        label = "layers" + (" + K/V to host" if to_host else "")

        def run(to_host=to_host) -> None:
            one_pass(source, args.prompt, params, to_host)

        rows[label] = median_ms(run, args.device, args.repeats)
        print(f"{label}: {rows[label]:.2f} ms", flush=True)
        fresh = f"{label}, each pass on a new thread"  # as gRPC pulls each request's frames
        rows[fresh] = median_ms(lambda run=run: on_new_thread(run), args.device, args.repeats)
        print(f"{fresh}: {rows[fresh]:.2f} ms", flush=True)
        if not args.contend:
            continue
        with gil_contender():  # each GIL hand-off can cost a switch interval: few repeats
            busy = f"{label}, another thread busy"
            rows[busy] = median_ms(run, args.device, 2)
            print(f"{busy}: {rows[busy]:.2f} ms", flush=True)
            sys.setswitchinterval(1e-4)
            try:
                rows[f"{busy}, switch 0.1 ms"] = median_ms(run, args.device, 2)
            finally:
                sys.setswitchinterval(default_interval)
    label = "frames (layers, K/V to host, encoding)"
    rows[f"{label}, this thread"] = median_ms(
        lambda: drain(frames(source, args.prompt, params)), args.device, args.repeats
    )
    rows[f"{label}, a new thread per pass"] = median_ms(
        lambda: on_new_thread(lambda: drain(frames(source, args.prompt, params))),
        args.device,
        args.repeats,
    )
    worker = KVWorker()  # as the service runs them: a new reader thread each, as gRPC's
    try:
        rows[f"{label}, on the KV worker, read on a new thread"] = median_ms(
            lambda: on_new_thread(
                lambda: drain(worker.submit(frames(source, args.prompt, params)).batches())
            ),
            args.device,
            args.repeats,
        )
    finally:
        worker.close()
    for name in list(rows)[-3:]:
        print(f"{name}: {rows[name]:.2f} ms", flush=True)
    syncs = Counter()
    if args.device == "cuda":
        syncs = synchronizing_ops(lambda: one_pass(source, args.prompt, params, False))

    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    print(
        f"\n{name}, {source.config.llm.num_layers} layers, contexts (kind: tokens) {tokens}, "
        f"load {load_s:.1f} s, default switch interval {default_interval * 1e3:.1f} ms"
    )
    width = max(len(label) for label in rows)
    print(f"{'case':<{width}} {'ms':>8}")
    for label, ms in rows.items():
        print(f"{label:<{width}} {ms:>8.2f}")
    print(f"\nGPU waits in one pass of the layers (no copies to host): {sum(syncs.values())}")
    for where, count in syncs.most_common(10):
        print(f"  {count:>4}  {where}")
    emit_json({"device": name, "tokens": tokens, "ms": rows, "syncs": dict(syncs)})


if __name__ == "__main__":
    main()
