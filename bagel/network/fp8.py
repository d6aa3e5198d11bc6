"""FP8 (e4m3) linear layers of the decoder, chosen at load: `load_bagel(...,
linear_precision="fp8")` swaps modules; the layer code is the same for both precisions.

What changes, per decoder layer:
- gen expert (the latent tokens, compute-bound): q/k/v/o and gate/up/down become `Fp8Linear`,
  e4m3 weights with one fp32 scale per output channel, e4m3 activations with one fp32 scale per
  token, bf16 out (`torch._scaled_mm` on GPUs that have FP8 tensor cores). The two RMSNorms in
  front of them become `Fp8RMSNorm` and the MLP `Fp8SwiGLU`, which hand their output over
  already quantized (`QuantizedRows`, produced inside the fused kernels of
  `bagel.kernels.fused_fp8`); o_proj quantizes the attention output itself.
- und expert (only the two marker tokens on the diffusion side, memory-bound): its seven linear
  layers become `Fp8WeightLinear`, e4m3 weights dequantized on the fly by a weight-streaming
  kernel, activations untouched: half the bytes of bf16 to read and to hold.
Embeddings, `vae2llm`/`llm2vae`, the time embedder, attention and the VAE stay in the model
dtype.

Every operation has a plain-PyTorch reference here (quantize with `torch.float8_e4m3fn` casts,
multiply the e4m3 values in fp32, scale): the CPU path, and what the GPU kernels are tested
against.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bagel.kernels import fused, fused_fp8
from bagel.kernels.fused_fp8 import AMAX_FLOOR, FP8, FP8_MAX, MATVEC_MAX_ROWS
from bagel.network.layers import RMSNorm, SwiGLU

LinearPrecision = Literal["bf16", "fp8"]
LINEAR_PRECISIONS: tuple[LinearPrecision, ...] = ("bf16", "fp8")

# cuBLASLt's fast accumulation (Hopper's FP8 tensor cores keep partial sums at reduced
# precision, never promoted to fp32 along K): its added error stays far below that of the e4m3
# roundings themselves, and the GEMMs run faster (docs/benchmarks.md, FP8 section).
FAST_ACCUM = True


@dataclass(frozen=True)
class QuantizedRows:
    """An activation quantized per row (per token): `data * scale` approximates it."""

    data: Tensor  # [..., K] float8_e4m3fn
    scale: Tensor  # [..., 1] float32
    dtype: torch.dtype  # of the activation before quantization, and of the linear's output

    @property
    def shape(self) -> torch.Size:
        return self.data.shape


# ---- plain-PyTorch reference ----------------------------------------------------------------


def quantize_rows_reference(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row e4m3: `factor = 448 / amax` (fp32), values `round(x * factor)`, scale `amax /
    448`. The largest magnitude of every row lands on +-448 exactly."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp_min(AMAX_FLOOR)
    # Tensor over tensor: one IEEE division, as the kernels do (`448 / amax` with a Python
    # number would be a reciprocal and a product, two roundings, and decide some ties otherwise).
    limit = torch.full_like(amax, FP8_MAX)
    data = (xf * (limit / amax)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return data, amax / limit


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """`[N, K]` -> (e4m3 `[N, K]`, fp32 scale per output channel `[N]`)."""
    data, scale = quantize_rows_reference(weight)
    return data, scale.squeeze(-1)


def scaled_matmul_reference(
    a: Tensor, a_scale: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None
) -> Tensor:
    """`(a * a_scale) @ (w * w_scale[:, None]).T + bias` in fp32: e4m3 products are exact in
    fp32, and each row and column scale applies once, as on the GPU."""
    out = (a.float() @ w.float().t()) * a_scale * w_scale
    return out if bias is None else out + bias.float()


# ---- dispatch: fused kernels and FP8 GEMMs on GPUs, the reference elsewhere ------------------


def quantize_rows(x: Tensor) -> QuantizedRows:
    data, scale = fused_fp8.quantize_rows(x) if fused.applies(x) else quantize_rows_reference(x)
    return QuantizedRows(data, scale, x.dtype)


@functools.cache
def _has_fp8_tensor_cores(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 9)


def runs_on_fp8_tensor_cores(device: torch.device | str) -> bool:
    """Whether FP8 linears on `device` multiply on FP8 tensor cores (sm_89 and later); elsewhere
    (the CPU, older GPUs) they run the plain-PyTorch reference, slower than bf16. On a GPU this
    initialises CUDA."""
    device = torch.device(device)
    return device.type == "cuda" and _has_fp8_tensor_cores(device)


@functools.cache
def _scaled_mm_adds_bias(device: torch.device) -> bool:
    """Whether this torch's `_scaled_mm` takes a bias with row-wise scales (torch 2.11 does).
    Probed on the first FP8 product, which is eager: graphs are captured after a warm-up."""
    a = torch.zeros(16, 16, device=device).to(FP8)
    ones = torch.ones(16, 1, device=device)
    try:
        torch._scaled_mm(
            a, a.t(), scale_a=ones, scale_b=ones.t(), bias=torch.zeros(16, device=device,
            dtype=torch.bfloat16), out_dtype=torch.bfloat16,
        )  # fmt: skip
    except RuntimeError:
        return False
    return True


def _uses_scaled_mm(a: Tensor, out_dtype: torch.dtype, n: int) -> bool:
    # cuBLASLt's row-wise FP8 GEMM: bf16 out, K and N multiples of 16.
    return (
        a.is_cuda
        and out_dtype == torch.bfloat16
        and a.shape[-1] % 16 == 0
        and n % 16 == 0
        and _has_fp8_tensor_cores(a.device)
    )


def fp8_linear(rows: QuantizedRows, weight: Tensor, w_scale: Tensor, bias: Tensor | None) -> Tensor:
    """`Fp8Linear`'s product: quantized rows `[..., K]` times e4m3 `weight` `[N, K]`."""
    k, n = rows.shape[-1], weight.shape[0]
    a, a_scale = rows.data.reshape(-1, k), rows.scale.reshape(-1, 1)
    if _uses_scaled_mm(a, rows.dtype, n):
        fused_bias = bias is not None and _scaled_mm_adds_bias(a.device)
        out = torch._scaled_mm(
            a, weight.t(), scale_a=a_scale, scale_b=w_scale.view(1, n),
            bias=bias if fused_bias else None, out_dtype=rows.dtype, use_fast_accum=FAST_ACCUM,
        )  # fmt: skip
        if bias is not None and not fused_bias:
            out += bias
    else:
        out = scaled_matmul_reference(a, a_scale, weight, w_scale, bias).to(rows.dtype)
    return out.view(*rows.shape[:-1], n)


def fp8_weight_linear(x: Tensor, weight: Tensor, w_scale: Tensor, bias: Tensor | None) -> Tensor:
    """`Fp8WeightLinear`'s product: `x` `[..., K]` in its own dtype times e4m3 `weight`."""
    if fused.applies(x) and x.numel() <= MATVEC_MAX_ROWS * x.shape[-1]:
        return fused_fp8.fp8_weight_matmul(x, weight, w_scale, bias)
    out = (x.float() @ weight.float().t()) * w_scale
    return (out if bias is None else out + bias.float()).to(x.dtype)


# ---- modules ------------------------------------------------------------------------------


def _take_quantized(module: nn.Module, linear: nn.Linear) -> None:
    """Give `module` the e4m3 form of `linear`'s weight, its scales, and `linear`'s bias."""
    data, scale = quantize_weight(linear.weight.detach())
    module.weight = nn.Parameter(data, requires_grad=False)
    module.register_buffer("weight_scale", scale)
    module.bias = linear.bias
    module.in_features, module.out_features = linear.in_features, linear.out_features


class Fp8Linear(nn.Module):
    """A linear layer with e4m3 weights (fp32 scale per output channel) that quantizes its
    input per token, unless the input comes quantized (`QuantizedRows`) from its producer."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        _take_quantized(self, linear)

    def forward(self, x: Tensor | QuantizedRows) -> Tensor:
        rows = x if isinstance(x, QuantizedRows) else quantize_rows(x)
        return fp8_linear(rows, self.weight, self.weight_scale, self.bias)


class Fp8WeightLinear(nn.Module):
    """A linear layer with e4m3 weights (fp32 scale per output channel) and activations in the
    model dtype: for passes over a few tokens, where reading the weights is the whole cost."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        _take_quantized(self, linear)

    def forward(self, x: Tensor) -> Tensor:
        return fp8_weight_linear(x, self.weight, self.weight_scale, self.bias)


class Fp8RMSNorm(RMSNorm):
    """RMSNorm whose output is quantized per token for the `Fp8Linear`s it feeds."""

    def forward(self, x: Tensor) -> QuantizedRows:  # type: ignore[override]
        if fused.applies(x):
            data, scale = fused_fp8.rms_norm_fp8(x, self.weight, self.eps)
            return QuantizedRows(data, scale, x.dtype)
        data, scale = quantize_rows_reference(super().forward(x))
        return QuantizedRows(data, scale, x.dtype)

    @classmethod
    def of(cls, norm: RMSNorm) -> Fp8RMSNorm:
        with torch.device("meta"):
            out = cls(norm.weight.shape[0], norm.eps)
        out.weight = norm.weight
        return out


class Fp8SwiGLU(nn.Module):
    """SwiGLU over `Fp8Linear`s; the activation product reaches `down_proj` quantized."""

    def __init__(self, mlp: SwiGLU) -> None:
        super().__init__()
        self.gate_proj = Fp8Linear(mlp.gate_proj)
        self.up_proj = Fp8Linear(mlp.up_proj)
        self.down_proj = Fp8Linear(mlp.down_proj)

    def forward(self, x: Tensor | QuantizedRows) -> Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if fused.applies(gate):
            data, scale = fused_fp8.silu_mul_fp8(gate, up)
            return self.down_proj(QuantizedRows(data, scale, gate.dtype))
        return self.down_proj(quantize_rows(F.silu(gate) * up))

    def add_to(self, residual: Tensor, x: Tensor | QuantizedRows, packed: bool = False) -> Tensor:
        """`residual + self(x)` (`_scaled_mm` takes no residual: a separate add). `SwiGLU.add_to`'s
        signature; `packed` (text decoding's one gate/up GEMM) has no FP8 form."""
        if packed:
            raise ValueError("an FP8 MLP has no packed gate/up projection")
        return residual + self(x)


# ---- the swap -----------------------------------------------------------------------------

_ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
_GEN_NORMS = ("input_layernorm_moe_gen", "post_attention_layernorm_moe_gen")


def quantized_weight_names(model: nn.Module) -> set[str]:
    """State-dict names of the weights `use_fp8_linears` quantizes (of the bf16 model)."""
    names = set()
    for index in range(len(model.language_model.model.layers)):
        layer = f"language_model.model.layers.{index}"
        for suffix in ("", "_moe_gen"):
            names |= {f"{layer}.self_attn.{p}{suffix}.weight" for p in _ATTENTION_LINEARS}
            names |= {f"{layer}.mlp{suffix}.{p}.weight" for p in _MLP_LINEARS}
    return names


def use_fp8_linears(model: nn.Module) -> nn.Module:
    """Swap, in place, every decoder layer's linear layers (both experts) and the gen expert's
    two RMSNorms for their FP8 forms, quantizing the weights. On the meta device it only builds
    the structure, which `load_state` then fills. Needs a model built `with_gen`."""
    if not getattr(model, "with_gen", False):
        raise ValueError("FP8 linear layers serve the generation forward: load the diffusion role")
    for layer in model.language_model.model.layers:
        attn = layer.self_attn
        for name in _ATTENTION_LINEARS:
            setattr(attn, f"{name}_moe_gen", Fp8Linear(getattr(attn, f"{name}_moe_gen")))
            setattr(attn, name, Fp8WeightLinear(getattr(attn, name)))
        layer.mlp_moe_gen = Fp8SwiGLU(layer.mlp_moe_gen)
        for name in _MLP_LINEARS:  # the und MLP keeps its eager/fused activation
            setattr(layer.mlp, name, Fp8WeightLinear(getattr(layer.mlp, name)))
        for name in _GEN_NORMS:
            setattr(layer, name, Fp8RMSNorm.of(getattr(layer, name)))
    return model


def state_quantizer(names: set[str]) -> Callable[[str, Tensor], dict[str, Tensor]]:
    """For `load_state`: each named weight, as it is read, becomes its e4m3 values and scales,
    so a load never holds more than one bf16 weight beside the FP8 ones."""

    def convert(name: str, tensor: Tensor) -> dict[str, Tensor]:
        if name not in names:
            return {name: tensor}
        data, scale = quantize_weight(tensor)
        return {name: data, f"{name}_scale": scale}

    return convert
