"""What one partial image costs rank 0 at a given size: the clean-image estimate's copy to the CPU,
the latent -> RGB map and the PNG encode, with the FLUX autoencoder's shapes (16 latent channels,
random weights: the cost does not depend on them). The map's one-time fit is timed separately.
Prints a table of median ms over `--repeats` previews and each as a share of `--request-s`, the
time of the request it rides on; the last line is one JSON object.

    python -m benchmarks.preview_cost [--size 1024] [--device cpu] [--request-s 9.3]
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script: the repo root, not benchmarks/, heads the import path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import statistics
import time

import torch

from bagel.diffusion.preview import fit_latent_rgb
from bagel.network.autoencoder import AutoEncoder, AutoEncoderParams
from benchmarks._report import emit_json
from serving.imaging.png import encode_png

PNG_LEVEL = 1  # the diffusion service's


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--device", default="cpu", help="where the latents live (cpu or cuda)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--request-s",
        type=float,
        default=9.3,
        help="the whole request's time the share is taken of (default: 1 H200, bf16, 1024^2)",
    )
    parser.add_argument("--json", default=None, help="also write the summary here")
    args = parser.parse_args()
    device = torch.device(args.device)
    params = AutoEncoderParams()
    torch.manual_seed(0)
    autoencoder = AutoEncoder(params).to(device).eval()

    start = time.perf_counter()
    latent_rgb = fit_latent_rgb(autoencoder)
    fit_ms = (time.perf_counter() - start) * 1e3

    patch = 2
    side = args.size // (params.downsample * patch)
    tokens = side * side
    estimate = torch.randn(tokens, patch * patch * params.z_channels, device=device)
    times = {"copy to cpu": [], "latent -> rgb": [], "png": []}
    for _ in range(args.repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        on_cpu = estimate.float().cpu()
        t1 = time.perf_counter()
        pixels = latent_rgb.pixels(on_cpu, side, side, patch)
        t2 = time.perf_counter()
        encode_png(pixels, level=PNG_LEVEL)
        t3 = time.perf_counter()
        for name, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            times[name].append(seconds * 1e3)
    medians = {name: statistics.median(values[1:]) for name, values in times.items()}
    per_preview = sum(medians.values())
    print(
        f"{args.size}x{args.size}, {tokens} latent tokens, preview {pixels.shape[1]}x{pixels.shape[0]}"
    )
    print(f"{'part':<16}{'ms':>10}")
    for name, ms in medians.items():
        print(f"{name:<16}{ms:>10.3f}")
    print(f"{'one preview':<16}{per_preview:>10.3f}")
    share = 3 * per_preview / (args.request_s * 1e3) * 100
    print(
        f"3 previews: {share:.3f}% of a {args.request_s:g} s request; map fitted once in {fit_ms:.0f} ms"
    )
    emit_json(
        {
            "size": args.size,
            "device": str(device),
            "ms": medians,
            "preview_ms": per_preview,
            "share_of_request_pct_3_previews": share,
            "fit_ms": fit_ms,
        },
        args.json,
    )


if __name__ == "__main__":
    main()
