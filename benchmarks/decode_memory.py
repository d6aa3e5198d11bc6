"""GPU memory of one FLUX VAE decode at BAGEL's output size, module by module.

On a diffusion rank the decode is the peak: the rank that decodes reaches ~2.4 GiB above its
weights at 1024², the others ~0.2 GiB. This decodes random latents with a randomly initialised
FLUX-shaped autoencoder and prints, for the modules that raise the peak the most, how far above
the memory allocated on entry each one peaks, plus the decode's whole peak over its weights,
with the weights in NCHW and in channels-last memory format (cuDNN's NHWC kernels then need no
transposed copies of the 256-channel 1024² maps), and the decode time of each.

    python -m benchmarks.decode_memory [--size 1024]
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script: the repo root, not benchmarks/, heads the import path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import json

import torch

from bagel.network.config import BAGEL_7B

GIB = 1024**3


def decode_peaks(ae, z: torch.Tensor) -> tuple[float, list[tuple[str, float]]]:
    """(whole decode's peak above what was allocated before it, [(module, its peak above its
    entry)]) in GiB."""
    rises: dict[str, float] = {}
    entry: dict[str, int] = {}

    def before(name):
        def hook(module, args):
            torch.cuda.synchronize()
            entry[name] = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()

        return hook

    def after(name):
        def hook(module, args, output):
            torch.cuda.synchronize()
            rises[name] = max(rises.get(name, 0.0), torch.cuda.max_memory_allocated() - entry[name])

        return hook

    leaves = [(n, m) for n, m in ae.decoder.named_modules() if not list(m.children())]
    handles = []
    for name, module in leaves:
        handles.append(module.register_forward_pre_hook(before(name)))
        handles.append(module.register_forward_hook(after(name)))
    try:
        ae.decode(z)
    finally:
        for h in handles:
            h.remove()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        ae.decode(z)
    torch.cuda.synchronize()
    whole = (torch.cuda.max_memory_allocated() - base) / GIB
    top = sorted(((n, r / GIB) for n, r in rises.items()), key=lambda x: -x[1])
    return whole, top


def decode_ms(ae, z: torch.Tensor, repeats: int = 5) -> float:
    ae.decode(z)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        ae.decode(z)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    from benchmarks.sp_gpu import random_autoencoder

    device = torch.device("cuda")
    ae = random_autoencoder(BAGEL_7B.vae, device, torch.bfloat16, 0)
    side = args.size // BAGEL_7B.vae.downsample
    z = torch.randn(1, BAGEL_7B.vae.z_channels, side, side, device=device, dtype=torch.bfloat16)
    results = {}
    with torch.no_grad():
        ae.to(memory_format=torch.contiguous_format)
        results["NCHW weights"] = decode_peaks(ae, z)
        nchw_image = ae.decode(z).float()
        ae.to(memory_format=torch.channels_last)  # as `load_autoencoder` leaves it on a GPU
        torch.cuda.empty_cache()
        results["channels-last weights"] = decode_peaks(ae, z)
        last_image = ae.decode(z).float()
        times = {}
        for label, fmt in (
            ("NCHW", torch.contiguous_format),
            ("channels-last", torch.channels_last),
        ):
            ae.to(memory_format=fmt)
            times[label] = decode_ms(ae, z)
    difference = ((last_image - nchw_image).abs().max() / nchw_image.abs().max()).item()
    print(f"\n{torch.cuda.get_device_name(0)}, FLUX VAE decode at {args.size}², bf16")
    print(
        f"decode ms: {times}; channels-last vs NCHW output, max relative difference {difference:.2e}"
    )
    for label, (whole, top) in results.items():
        print(f"{label}: whole decode peaks {whole:.2f} GiB above its input and weights")
        for name, rise in top[: args.top]:
            print(f"  {rise:6.2f} GiB  {name}")
    peaks = {k: {"whole_gib": w, "top": t[: args.top]} for k, (w, t) in results.items()}
    print(json.dumps({"peaks": peaks, "decode_ms": times, "max_rel_difference": difference}))


if __name__ == "__main__":
    main()
