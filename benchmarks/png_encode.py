"""PNG encoding of one picture: PIL's `save(compress_level=...)` against `serving.imaging.png.encode_png`
with 1, 2, 4 and 8 threads (those up to the CPU count), on a noise picture (what random weights
decode to) and a smooth one (a sinusoidal gradient plus a little noise). Prints the median ms of
`--repeats` encodes and the file size in KB; the last line is one JSON object.

    python -m benchmarks.png_encode [--size 1024] [--level 1] [--repeats 15]
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
import statistics
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from serving.imaging.png import encode_png


def pictures(size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    waves = np.stack([np.sin(x / 37 + c) * np.cos(y / 53 - c) for c in range(3)], -1)
    smooth = 127 + 100 * waves + rng.normal(0, 1, waves.shape)
    return {
        "noise": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        "smooth": np.clip(smooth, 0, 255).astype(np.uint8),
    }


def pil_png(pixels: np.ndarray, level: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=level)
    return buffer.getvalue()


def median_ms(fn: Callable[[], bytes], repeats: int) -> tuple[float, int]:
    """Median ms of `fn` over `repeats` calls after one warm-up, and its output's size."""
    size = len(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="picture side in pixels")
    parser.add_argument("--level", type=int, default=1, help="zlib level, both encoders")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    encoders: dict[str, Callable[[np.ndarray], bytes]] = {
        f"PIL compress_level={args.level}": lambda p: pil_png(p, args.level)
    }
    for threads in (t for t in (1, 2, 4, 8) if t <= cpus):
        encoders[f"encode_png threads={threads}"] = lambda p, t=threads: encode_png(
            p, level=args.level, threads=t
        )
    images = pictures(args.size)
    print(
        f"{args.size}x{args.size} RGB, zlib level {args.level}, {cpus} CPUs, median of "
        f"{args.repeats}"
    )
    print(f"{'encoder':<28}" + "".join(f"{name + ' ms':>12}{name + ' KB':>12}" for name in images))
    results = {}
    for label, encode in encoders.items():
        row = {}
        for name, pixels in images.items():
            ms, size = median_ms(lambda e=encode, p=pixels: e(p), args.repeats)
            row[name] = {"ms": round(ms, 2), "kb": round(size / 1024, 1)}
        results[label] = row
        print(f"{label:<28}" + "".join(f"{r['ms']:>12.1f}{r['kb']:>12.0f}" for r in row.values()))
    print(json.dumps({"size": args.size, "level": args.level, "cpus": cpus, "results": results}))


if __name__ == "__main__":
    main()
