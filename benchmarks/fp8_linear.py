"""One decoder layer's linear layers in bf16 and in FP8 (`bagel.network.fp8`), at BAGEL-7B shapes,
GPU.

Gen expert: the chain RMSNorm -> q/k/v, attention output -> o, RMSNorm -> gate/up -> SwiGLU
activation -> down over `--tokens` rows (default 2 branches x 4098), each stage and the whole
chain, bf16 (`bagel.kernels.fused` kernels + cuBLAS) against FP8 (the producers quantize per token,
`torch._scaled_mm` with row-wise scales). Und expert: the seven linear layers over the 4 marker
rows of two branches, bf16 cuBLAS against the FP8 weight-streaming kernel, cycling over several
layers' weights so that L2 holds none of them. Times are CUDA-graph replays (Triton's
`do_bench_cudagraph`), median. Prints a table; the last line is one JSON object.

    python -m benchmarks.fp8_linear
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script: the repo root, not benchmarks/, heads the import path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bagel.kernels import fused, fused_fp8
from bagel.network import fp8
from bagel.network.config import BAGEL_7B_LLM
from benchmarks._report import emit_json


def bench(fn: Callable[[], object]) -> float:
    """Median ms of one call of `fn`, replayed from a CUDA graph."""
    from triton.testing import do_bench_cudagraph

    fn()  # eager first: compiles kernels, runs one-time probes outside any capture
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=200, return_mode="median")


def weights(n: int, k: int, gen: torch.Generator, bias: bool = False):
    w = (torch.randn(n, k, device="cuda", generator=gen) / k**0.5).bfloat16()
    b = (0.02 * torch.randn(n, device="cuda", generator=gen)).bfloat16() if bias else None
    return w, b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2 * 4098, help="gen rows (both branches)")
    parser.add_argument("--marker-rows", type=int, default=4, help="und rows (both branches)")
    parser.add_argument("--und-layers", type=int, default=4, help="layers' und weights cycled")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    llm = BAGEL_7B_LLM
    hidden, inter = llm.hidden_size, llm.intermediate_size
    kv = llm.num_kv_heads * llm.head_dim
    gen = torch.Generator(device="cuda").manual_seed(0)
    m = args.tokens
    x = torch.randn(m, hidden, device="cuda", generator=gen).bfloat16()
    attn = torch.randn(m, hidden, device="cuda", generator=gen).bfloat16()
    norm_w = (1 + 0.05 * torch.randn(hidden, device="cuda", generator=gen)).bfloat16()
    shapes = {
        "q": (hidden, hidden, True),
        "k": (kv, hidden, True),
        "v": (kv, hidden, True),
        "o": (hidden, hidden, False),
        "gate": (inter, hidden, False),
        "up": (inter, hidden, False),
        "down": (hidden, inter, False),
    }
    w = {name: weights(n, k, gen, b) for name, (n, k, b) in shapes.items()}
    q8 = {name: (*fp8.quantize_weight(wt), b) for name, (wt, b) in w.items()}
    eps = llm.rms_norm_eps

    def rows(pair: tuple[torch.Tensor, torch.Tensor]) -> fp8.QuantizedRows:
        return fp8.QuantizedRows(pair[0], pair[1], torch.bfloat16)

    h8 = rows(fused_fp8.rms_norm_fp8(x, norm_w, eps))
    gate, up = F.linear(x, w["gate"][0]), F.linear(x, w["up"][0])
    act8 = rows(fused_fp8.silu_mul_fp8(gate, up))
    act = fused.silu_mul(gate, up)
    attn8 = rows(fused_fp8.quantize_rows(attn))

    def mm(name: str, a: fp8.QuantizedRows) -> torch.Tensor:
        return fp8.fp8_linear(a, *q8[name])

    stages: dict[str, tuple[Callable, Callable | None]] = {
        "RMSNorm before q/k/v (fp8: + quantize)": (
            lambda: fused.rms_norm(x, norm_w, eps),
            lambda: fused_fp8.rms_norm_fp8(x, norm_w, eps),
        ),
        "q, k, v GEMMs": (
            lambda: [F.linear(x, *w[n]) for n in ("q", "k", "v")],
            lambda: [mm(n, h8) for n in ("q", "k", "v")],
        ),
        "o_proj input quantize": (None, lambda: fused_fp8.quantize_rows(attn)),
        "o GEMM": (lambda: F.linear(attn, *w["o"]), lambda: mm("o", attn8)),
        "RMSNorm before gate/up (fp8: + quantize)": (
            lambda: fused.rms_norm(x, norm_w, eps),
            lambda: fused_fp8.rms_norm_fp8(x, norm_w, eps),
        ),
        "gate, up GEMMs": (
            lambda: [F.linear(x, *w[n]) for n in ("gate", "up")],
            lambda: [mm(n, h8) for n in ("gate", "up")],
        ),
        "SwiGLU activation (fp8: + quantize)": (
            lambda: fused.silu_mul(gate, up),
            lambda: fused_fp8.silu_mul_fp8(gate, up),
        ),
        "down GEMM": (lambda: F.linear(act, *w["down"]), lambda: mm("down", act8)),
    }

    def bf16_chain():
        h = fused.rms_norm(x, norm_w, eps)
        [F.linear(h, *w[n]) for n in ("q", "k", "v")]
        F.linear(attn, *w["o"])
        h = fused.rms_norm(x, norm_w, eps)
        g, u = F.linear(h, *w["gate"]), F.linear(h, *w["up"])
        return F.linear(fused.silu_mul(g, u), *w["down"])

    def fp8_chain():
        h = rows(fused_fp8.rms_norm_fp8(x, norm_w, eps))
        [mm(n, h) for n in ("q", "k", "v")]
        mm("o", fp8.quantize_rows(attn))
        h = rows(fused_fp8.rms_norm_fp8(x, norm_w, eps))
        g, u = mm("gate", h), mm("up", h)
        return mm("down", rows(fused_fp8.silu_mul_fp8(g, u)))

    results: dict[str, dict[str, float | None]] = {}
    for name, (plain, quantized) in stages.items():
        results[name] = {
            "bf16_ms": bench(plain) if plain else None,
            "fp8_ms": bench(quantized) if quantized else None,
        }
    gemms_bf16 = sum(results[s]["bf16_ms"] for s in stages if "GEMM" in s)
    gemms_fp8 = sum(results[s]["fp8_ms"] for s in stages if "GEMM" in s)
    results["GEMMs alone (sum)"] = {"bf16_ms": gemms_bf16, "fp8_ms": gemms_fp8}
    fast = fp8.FAST_ACCUM
    fp8.FAST_ACCUM = not fast
    results[f"GEMMs alone, use_fast_accum={not fast} (sum)"] = {
        "bf16_ms": None,
        "fp8_ms": sum(bench(stages[s][1]) for s in stages if "GEMM" in s),
    }
    fp8.FAST_ACCUM = fast
    results["whole chain (one graph)"] = {"bf16_ms": bench(bf16_chain), "fp8_ms": bench(fp8_chain)}

    # Und expert: the markers of two branches through the seven linear layers, several layers'
    # weights in turn (each layer's are 233 MB in FP8, 466 MB in bf16: more than L2).
    markers = torch.randn(args.marker_rows, hidden, device="cuda", generator=gen).bfloat16()
    und = [
        {n: weights(*shapes[n][:2], gen, shapes[n][2]) for n in shapes}
        for _ in range(args.und_layers)
    ]
    und8 = [{n: (*fp8.quantize_weight(wt), b) for n, (wt, b) in layer.items()} for layer in und]

    def und_bf16():
        for layer in und:
            for wt, b in layer.values():
                F.linear(markers if wt.shape[1] == hidden else act[: args.marker_rows], wt, b)

    def und_fp8():
        for layer in und8:
            for wt, s, b in layer.values():
                a = markers if wt.shape[1] == hidden else act[: args.marker_rows]
                fused_fp8.fp8_weight_matmul(a, wt, s, b)

    per_layer = 1.0 / args.und_layers
    results["und expert, 7 linears over the markers (per layer)"] = {
        "bf16_ms": bench(und_bf16) * per_layer,
        "fp8_ms": bench(und_fp8) * per_layer,
    }
    bytes_bf16 = sum(n * k * 2 for n, k, _ in shapes.values())
    results["weights per layer and expert (MiB)"] = {
        "bf16_ms": bytes_bf16 / 2**20,
        "fp8_ms": (bytes_bf16 / 2 + sum(4 * n for n, _, _ in shapes.values())) / 2**20,
    }

    # For scale: the FP8 gate projection of the normed rows against fp32 on the bf16 ones.
    want = fused.rms_norm(x, norm_w, eps).float() @ w["gate"][0].float().t()
    rel = ((mm("gate", h8).float() - want).norm() / want.norm()).item()

    print(
        f"\n{torch.cuda.get_device_name(0)}, torch {torch.__version__}, {m} gen rows, "
        f"{args.marker_rows} marker rows, hidden {hidden}, MLP {inter}, kv {kv}; "
        f"use_fast_accum={fp8.FAST_ACCUM}; "
        f"_scaled_mm bias with row-wise scales: {fp8._scaled_mm_adds_bias(x.device)}"
    )
    print(f"{'stage':<55} {'bf16 ms':>9} {'fp8 ms':>9} {'bf16/fp8':>9}")
    for name, r in results.items():
        b, f = r["bf16_ms"], r["fp8_ms"]
        ratio = f"{b / f:>9.2f}" if b and f else f"{'':>9}"
        print(
            f"{name:<55} {b if b is not None else float('nan'):>9.3f} "
            f"{f if f is not None else float('nan'):>9.3f} {ratio}"
        )
    print(f"gate GEMM, fp8 vs bf16 reference, relative L2: {rel:.2e}")
    summary = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "tokens": m,
        "scaled_mm_bias": fp8._scaled_mm_adds_bias(x.device),
        "use_fast_accum": fp8.FAST_ACCUM,
        "gate_rel_l2": rel,
        "results": results,
    }
    emit_json(summary, args.json)


if __name__ == "__main__":
    main()
