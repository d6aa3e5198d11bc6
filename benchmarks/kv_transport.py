"""KV transport throughput: our codec against a bare gRPC byte stream, and the rank broadcast.

Streams a text-to-image cache (3 contexts of ~30 tokens, ~5 MB) and an image-editing cache
(~5,000 tokens, ~287 MB) at BAGEL-7B dimensions (28 layers, 4 KV heads, head dim 128, bf16)
through a real grpc.aio server on 127.0.0.1 in another process, every check on; in the same run
streams the same bytes as ready-made 1 MiB messages with no checks (the ceiling), and as 1 MiB
messages that carry only the work no checked stream can skip (the floor: the sender CRCs each piece
of tensor memory and copies it into a message, the receiver copies it into a flat buffer and CRCs
the copy; no framing, no contract checks, no digest); then times
`broadcast_kv` of the large cache over 2 and 4 gloo ranks (and NCCL where there are >= 2 GPUs).
The last line printed is one JSON object.

    python -m benchmarks.kv_transport [--quick] [--repeats N] [--default-malloc]
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script: the repo root, not benchmarks/, heads the import path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import asyncio
import json
import multiprocessing as mp
import socket
import statistics
import time
from datetime import timedelta
from multiprocessing.connection import Connection

import grpc
import torch
import torch.distributed as dist

from bagel.network.kv import Branch, ContextKV
from protos import GenerateEvent
from transport import (
    DEFAULT_CHUNK_SIZE,
    BufferPool,
    FrameAssembler,
    KVCache,
    KVEncoder,
    KVLayout,
    KVSpec,
    broadcast_kv,
    channel_options,
    diffusion_generate,
    diffusion_handler,
    receive_kv,
    server_options,
    tune_malloc,
)
from transport.crc import crc32c, extend

LAYERS, KV_HEADS, HEAD_DIM, DTYPE = 28, 4, 128, torch.bfloat16
FINGERPRINT = "bench-bagel-7b"
BARE_METHOD = "/bench.Bare/Stream"
FLOOR_METHOD = "/bench.Bare/Floor"
SMALL = (32, 28, 30)  # text to image: prompt, empty negative, prompt again
LARGE = (2500, 2450, 50)  # image editing: prompt + image, image alone, prompt alone
LARGE_QUICK = (250, 245, 5)


def make_cache(tokens: tuple[int, ...], seed: int = 0) -> dict[Branch, ContextKV]:
    """One context per entry of `tokens`, in `Branch` order (COND, UNCOND_TEXT, UNCOND_IMG)."""
    gen = torch.Generator().manual_seed(seed)

    def tensor(n: int) -> torch.Tensor:
        return torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen).to(DTYPE)

    return {
        branch: ContextKV([tensor(n) for _ in range(LAYERS)], [tensor(n) for _ in range(LAYERS)], n)
        for branch, n in zip(Branch, tokens, strict=False)
    }


def flatten(contexts: dict[Branch, ContextKV]) -> torch.Tensor:
    """The payload as one flat uint8 buffer, in wire order."""
    return torch.cat(
        [
            t.reshape(-1).view(torch.uint8)
            for c in contexts.values()
            for pair in zip(c.keys, c.values, strict=True)
            for t in pair
        ]
    )


# --- the server process --------------------------------------------------------------------


def _serve(conn: Connection) -> None:
    torch.set_num_threads(1)
    asyncio.run(_serve_async(conn))


async def _serve_async(conn: Connection) -> None:
    spec = KVSpec(FINGERPRINT, LAYERS, KV_HEADS, HEAD_DIM)
    pool = BufferPool()  # as a service does: received buffers are reused across requests

    async def generate(frames, context):
        start = time.perf_counter()
        assembler = FrameAssembler(spec, buffers=pool)
        received = await receive_kv(frames, assembler)
        stats = {
            "receive_ms": (time.perf_counter() - start) * 1e3,
            "copied": assembler.received_bytes,
        }
        received.cache.release()
        conn.send_bytes(json.dumps(stats).encode())
        yield GenerateEvent()

    async def bare(frames, context):
        total = 0
        async for frame in frames:
            total += len(frame)
        yield str(total).encode()

    floor_flat = torch.empty(512 << 20, dtype=torch.uint8).numpy()
    floor_dest = memoryview(floor_flat)

    async def floor(frames, context):
        # What FrameAssembler does per chunk, and nothing else: copy, then CRC the copy in pieces.
        total = 0
        async for frame in frames:
            source, size, checksum = memoryview(frame), len(frame), 0
            for pos in range(0, size, 256 << 10):
                at, end = total + pos, total + min(pos + (256 << 10), size)
                floor_dest[at:end] = source[pos : end - total]
                checksum = extend(checksum, floor_flat[at:end])
            total += size
        yield str(total).encode()

    server = grpc.aio.server(options=server_options())
    bare_handler = grpc.method_handlers_generic_handler(
        "bench.Bare",
        {
            "Stream": grpc.stream_stream_rpc_method_handler(bare),
            "Floor": grpc.stream_stream_rpc_method_handler(floor),
        },
    )
    server.add_generic_rpc_handlers((diffusion_handler(generate), bare_handler))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    conn.send_bytes(str(port).encode())
    await server.wait_for_termination()


# --- streaming over gRPC -------------------------------------------------------------------


async def stream_case(
    port: int, conn: Connection, contexts: dict[Branch, ContextKV], repeats: int
) -> dict[str, float]:
    """Alternate codec, bare and floor runs after one warm-up each; return medians."""
    layout = KVLayout.of(contexts)
    payload = flatten(contexts).numpy()
    total = layout.total_bytes
    bare_messages = [
        payload[i : i + DEFAULT_CHUNK_SIZE].tobytes() for i in range(0, total, DEFAULT_CHUNK_SIZE)
    ]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=channel_options()) as ch:
        kv_call = diffusion_generate(ch)
        bare_call = ch.stream_stream(BARE_METHOD)
        floor_call = ch.stream_stream(FLOOR_METHOD)

        async def kv_once() -> tuple[float, float, float]:
            encoder = KVEncoder(layout, request_id="bench", fingerprint=FINGERPRINT)

            def frames():
                yield encoder.header()
                for layer in range(layout.num_layers):
                    yield from encoder.layer(
                        layer, [(c.keys[layer], c.values[layer]) for c in contexts.values()]
                    )
                yield encoder.trailer()

            start = time.perf_counter()
            [_ async for _ in kv_call(frames())]
            wall = time.perf_counter() - start
            stats = json.loads(conn.recv_bytes())
            return wall, encoder.bytes_copied / total, stats["copied"] / total

        async def bare_once() -> float:
            start = time.perf_counter()
            replies = [r async for r in bare_call(iter(bare_messages))]
            wall = time.perf_counter() - start
            assert int(replies[-1]) == total
            return wall

        async def floor_once() -> float:
            def messages():
                for i in range(0, total, DEFAULT_CHUNK_SIZE):
                    piece = payload[i : i + DEFAULT_CHUNK_SIZE]
                    crc32c(piece)
                    yield piece.tobytes()

            start = time.perf_counter()
            replies = [r async for r in floor_call(messages())]
            wall = time.perf_counter() - start
            assert int(replies[-1]) == total
            return wall

        await kv_once()
        await bare_once()
        await floor_once()
        kv, bare, floor = [], [], []
        for _ in range(repeats):
            wall, sent_copies, received_copies = await kv_once()
            kv.append(wall)
            bare.append(await bare_once())
            floor.append(await floor_once())
    kv_s, bare_s = statistics.median(kv), statistics.median(bare)
    floor_s = statistics.median(floor)
    return {
        "bytes": total,
        "frames": len(bare_messages),
        "kv_ms": kv_s * 1e3,
        "bare_ms": bare_s * 1e3,
        "kv_GBps": total / kv_s / 1e9,
        "bare_GBps": total / bare_s / 1e9,
        "floor_ms": floor_s * 1e3,
        "floor_GBps": total / floor_s / 1e9,
        "sent_copies": sent_copies,
        "received_copies": received_copies,
    }


# --- broadcast -----------------------------------------------------------------------------


def _broadcast_rank(
    rank: int,
    world: int,
    port: int,
    backend: str,
    tokens: tuple[int, ...],
    repeats: int,
    conn: Connection | None,
) -> None:
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    try:
        cache = None
        if rank == 0:
            contexts = make_cache(tokens)
            flat = flatten(contexts)
            cache = KVCache.wrap(
                KVLayout.of(contexts), flat.pin_memory() if backend == "nccl" else flat
            )
        pool = BufferPool()
        times, result = [], None
        for _ in range(repeats + 1):  # the first run warms up connections and buffers
            if result is not None and rank != 0:
                result.release()
            dist.barrier()
            start = time.perf_counter()
            result = broadcast_kv(cache, device=device, buffers=pool)
            if backend == "nccl":
                torch.cuda.synchronize(device)
            dist.barrier()
            times.append(time.perf_counter() - start)
        # Every rank's copy must equal rank 0's: compare CRCs of the last broadcast.
        digest = torch.tensor([crc32c(result.flat.cpu().numpy())], dtype=torch.int64, device=device)
        digests = [torch.zeros_like(digest) for _ in range(world)]
        dist.all_gather(digests, digest)
        same = all(int(d) == int(digest) for d in digests)
        if conn is not None:
            conn.send_bytes(
                json.dumps({"seconds": statistics.median(times[1:]), "same": same}).encode()
            )
    finally:
        dist.destroy_process_group()


def time_broadcast(world: int, backend: str, tokens: tuple[int, ...], repeats: int) -> float:
    ctx = mp.get_context("spawn" if backend == "nccl" else "fork")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    parent, child = ctx.Pipe()
    procs = [
        ctx.Process(
            target=_broadcast_rank,
            args=(r, world, port, backend, tokens, repeats, child if r == 0 else None),
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    reply = json.loads(parent.recv_bytes())
    for p in procs:
        p.join()
    if not reply["same"]:
        raise AssertionError(f"{backend} x{world}: a rank's cache differs from rank 0's")
    return reply["seconds"]


# --- main ------------------------------------------------------------------------------------


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~29 MB large case, 3 repeats")
    parser.add_argument("--repeats", type=int, help="timed runs per case (median reported)")
    parser.add_argument(
        "--default-malloc", action="store_true", help="skip tune_malloc() (glibc defaults)"
    )
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 9)
    large = LARGE_QUICK if args.quick else LARGE
    malloc_tuned = False if args.default_malloc else tune_malloc()
    torch.set_num_threads(1)

    # Fork the server before this process creates any gRPC object.
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(child,), daemon=True)
    server.start()
    port = int(parent.recv_bytes())
    try:
        results = {
            name: asyncio.run(stream_case(port, parent, make_cache(tokens, seed=1), repeats))
            for name, tokens in (("small", SMALL), ("large", large))
        }
    finally:
        server.kill()
        server.join()

    print(
        f"KV over loopback gRPC (grpc.aio server in another process), BAGEL-7B dims, bf16, "
        f"1 MiB chunks, median of {repeats}; malloc tuned: {malloc_tuned}"
    )
    rows = [["case", "MB", "ms", "MB/s", "copies/byte (send + receive)"]]
    for name, tokens in (("small", SMALL), ("large", large)):
        r = results[name]
        mb = f"{r['bytes'] / 1e6:.1f}"
        label = f"{name}, {sum(tokens)} tokens"
        copies = f"{r['sent_copies']:.2f} + {r['received_copies']:.2f}"
        rows.append(
            [
                f"{label}: codec, checks on",
                mb,
                f"{r['kv_ms']:.1f}",
                f"{r['kv_GBps'] * 1e3:.0f}",
                copies,
            ]
        )
        rows.append(
            [
                f"{label}: bare 1 MiB bytes",
                mb,
                f"{r['bare_ms']:.1f}",
                f"{r['bare_GBps'] * 1e3:.0f}",
                "0 + 0",
            ]
        )
        rows.append(
            [
                f"{label}: floor, CRC + 1 copy a side",
                mb,
                f"{r['floor_ms']:.1f}",
                f"{r['floor_GBps'] * 1e3:.0f}",
                "1 + 1",
            ]
        )
    _table(rows)
    print(
        "copies/byte counts our copies; gRPC's own (bytes <-> its slices, the socket) are in both"
    )

    backends = [("gloo", 2), ("gloo", 4)]
    if torch.cuda.is_available():
        backends += [("nccl", w) for w in (2, 4) if w <= torch.cuda.device_count()]
    total = results["large"]["bytes"]
    print(f"\nbroadcast_kv of the large cache ({total / 1e6:.1f} MB), median of {repeats}")
    rows = [["backend", "ranks", "ms", "MB/s"]]
    bcast = {}
    for backend, world in backends:
        seconds = time_broadcast(world, backend, large, repeats)
        bcast[f"bcast_{backend}{world}_GBps"] = round(total / seconds / 1e9, 3)
        rows.append([backend, str(world), f"{seconds * 1e3:.1f}", f"{total / seconds / 1e6:.0f}"])
    _table(rows)

    big = results["large"]
    print(
        json.dumps(
            {
                "kv_GBps": round(big["kv_GBps"], 3),
                "bare_GBps": round(big["bare_GBps"], 3),
                "kv_over_bare": round(big["kv_GBps"] / big["bare_GBps"], 3),
                "floor_GBps": round(big["floor_GBps"], 3),
                "floor_over_bare": round(big["floor_GBps"] / big["bare_GBps"], 3),
                "kv_MB": round(big["bytes"] / 1e6, 1),
                "small_kv_ms": round(results["small"]["kv_ms"], 2),
                "small_bare_ms": round(results["small"]["bare_ms"], 2),
                "malloc_tuned": malloc_tuned,
                **bcast,
            }
        )
    )


if __name__ == "__main__":
    main()
