"""The FP8 Triton attention (`bagel.kernels.fp8_attention`) against cuDNN's bf16 attention at the
generation block's shapes, GPU.

One call per branch and layer: q `[1, 2 + latents, 28, 128]` against `--prefix` text keys plus
the markers and latents, 4 KV heads; 1024x1024 (4096 latents) and 512x512 (1024). For cuDNN
(`SDPBackend.CUDNN_ATTENTION`, today's call) and for the FP8 kernel in every configuration of
`CONFIGS`, with P·V in FP8 and in bf16 (its times include the K/V quantize pass, also timed
alone), it prints the median ms of 20 calls after warm-up (CUDA events), TFLOP/s, and the error
against cuDNN's bf16 output (max abs, PSNR in dB over the output's peak) and against fp32
attention. The default configuration runs once more with a key mask of 7 pad keys, against SDPA
with the same mask (the backend PyTorch picks, as the model's masked call). The last line is one
JSON object. Without a CUDA GPU it says so and exits with status 2.

    python -m benchmarks.fp8_attention
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script: the repo root, not benchmarks/, heads the import path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import math
from collections.abc import Callable

import torch

from benchmarks._report import emit_json

HEADS, KV_HEADS, HEAD_DIM = 28, 4, 128
RESOLUTIONS = {"1024x1024": 4096, "512x512": 1024}  # image -> latent tokens


def time_ms(fn: Callable[[], object], warmup: int = 3, reps: int = 20) -> float:
    """Median ms of `reps` calls of `fn` after `warmup`, each timed by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def psnr_db(got: torch.Tensor, want: torch.Tensor) -> float:
    rms = (got.float() - want.float()).pow(2).mean().sqrt().item()
    return math.inf if rms == 0 else 20 * math.log10(want.abs().max().item() / rms)


def errors(got: torch.Tensor, bf16: torch.Tensor, fp32: torch.Tensor) -> dict[str, float]:
    return {
        "max_abs_vs_bf16": (got.float() - bf16.float()).abs().max().item(),
        "psnr_vs_bf16_db": psnr_db(got, bf16),
        "psnr_vs_fp32_db": psnr_db(got, fp32),
    }


def bench_resolution(image: str, latents: int, prefix: int, qk_std: float) -> list[dict]:
    """Every case at one image size; prints its table and returns its rows."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bagel.kernels import fp8_attention as fa
    from bagel.network.attention import sdpa
    from diffusion_service.parallel.lse import attention_with_lse

    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(rows: int, heads: int, std: float) -> torch.Tensor:
        x = torch.randn(1, rows, heads, HEAD_DIM, generator=gen, device="cuda")
        return (std * x).bfloat16()

    q_len, k_len = 2 + latents, prefix + 2 + latents
    q, k, v = randn(q_len, HEADS, qk_std), randn(k_len, KV_HEADS, qk_std), randn(k_len, KV_HEADS, 1)
    # The CFG-batched forward's prefixes differ in length: a few pad keys at the front.
    mask = torch.ones(1, k_len, dtype=torch.bool, device="cuda")
    mask[:, :7] = False
    fp32 = {
        False: attention_with_lse(q.float(), k.float(), v.float())[0],
        True: attention_with_lse(q.float(), k.float(), v.float(), mask)[0],
    }
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        bf16 = {False: sdpa(q, k, v, None)}
        ms = {"cuDNN bf16": time_ms(lambda: sdpa(q, k, v, None))}
    # With a mask, the backend PyTorch picks, as the model's masked call gets.
    bf16[True] = sdpa(q, k, v, mask)
    ms["SDPA bf16 (PyTorch's pick), key mask"] = time_ms(lambda: sdpa(q, k, v, mask))
    outs = {"cuDNN bf16": bf16[False], "SDPA bf16 (PyTorch's pick), key mask": bf16[True]}
    masked = {"SDPA bf16 (PyTorch's pick), key mask"}
    failed: dict[str, str] = {}  # case -> why it did not run; the other cases still do
    for name, config in fa.CONFIGS.items():
        for pv_fp8 in (True, False):
            label = f"fp8 {name}, P·V {'fp8' if pv_fp8 else 'bf16'}"
            variants = {label: None}
            if config == fa.DEFAULT_CONFIG:
                variants[f"{label}, key mask"] = mask
                masked.add(f"{label}, key mask")
            for case, key_mask in variants.items():

                def call(key_mask=key_mask, pv_fp8=pv_fp8, config=config):
                    return fa.fp8_attention(q, k, v, key_mask, pv_fp8=pv_fp8, config=config)

                try:
                    outs[case] = call()[0]
                except Exception as e:  # e.g. a config asking more shared memory than there is
                    failed[case] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    continue
                ms[case] = time_ms(call)
    quantize_ms = {
        pv_fp8: time_ms(lambda pv_fp8=pv_fp8: fa.quantize_kv(k, v, pv_fp8))
        for pv_fp8 in (True, False)
    }
    flops = 4 * HEADS * q_len * k_len * HEAD_DIM
    print(f"\n{image}: q {q_len} rows, {k_len} keys")
    print(f"{'case':<44} {'ms':>7} {'TFLOP/s':>8} {'max abs':>9} {'dB bf16':>8} {'dB fp32':>8}")
    rows = []
    for case, out in outs.items():
        m = case in masked
        row = {"image": image, "case": case, "ms": ms[case], "tflops": flops / ms[case] / 1e9}
        row.update(errors(out, bf16[m], fp32[m]))
        rows.append(row)
        print(
            f"{case:<44} {row['ms']:>7.3f} {row['tflops']:>8.1f} {row['max_abs_vs_bf16']:>9.2e} "
            f"{row['psnr_vs_bf16_db']:>8.1f} {row['psnr_vs_fp32_db']:>8.1f}"
        )
    for case, why in failed.items():
        print(f"{case:<44} failed: {why}")
        rows.append({"image": image, "case": case, "failed": why})
    print(
        f"of which the K/V quantize pass: {quantize_ms[True]:.3f} ms (K and V), "
        f"{quantize_ms[False]:.3f} ms (K only, P·V bf16)"
    )
    rows.append({"image": image, "case": "K/V quantize pass (K and V)", "ms": quantize_ms[True]})
    rows.append({"image": image, "case": "K quantize pass (P·V bf16)", "ms": quantize_ms[False]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", type=int, default=42, help="text keys before the markers")
    parser.add_argument(
        "--qk-std", type=float, default=1.0, help="std of q and k (larger: peakier attention)"
    )
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks.fp8_attention: needs a CUDA GPU, and none is visible")
        sys.exit(2)
    from bagel.kernels import fp8_attention as fa

    if not fa.available():
        print("benchmarks.fp8_attention: needs Triton and a GPU with FP8 tensor cores (sm_89+)")
        sys.exit(2)
    print(
        f"\n{torch.cuda.get_device_name(0)}, torch {torch.__version__}, heads {HEADS}/{KV_HEADS}"
        f" x {HEAD_DIM}, q/k std {args.qk_std}, one branch per call"
    )
    results = []
    for image, latents in RESOLUTIONS.items():
        results += bench_resolution(image, latents, args.prefix, args.qk_std)
        torch.cuda.empty_cache()
    # JSON has no infinity: a PSNR against itself (no error at all) is written as null.
    for row in results:
        row.update({key: None for key, x in row.items() if isinstance(x, float) and math.isinf(x)})
    emit_json(
        {
            "device": torch.cuda.get_device_name(0),
            "torch": torch.__version__,
            "qk_std": args.qk_std,
            "prefix": args.prefix,
            "results": results,
        },
        args.json,
    )


if __name__ == "__main__":
    main()
