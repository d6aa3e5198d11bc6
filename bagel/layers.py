"""Building blocks of the Qwen2-MoT decoder: RMSNorm, rotary embedding, the SwiGLU MLP, the
timestep embedder, and one expert's attention projections."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bagel import fused


def compute_dtype(x: Tensor) -> torch.dtype:
    """fp32 for half-precision inputs, the input's own dtype when it is wider (fp64 tests)."""
    return torch.promote_types(x.dtype, torch.float32)


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalise in fp32, cast back, then scale."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if fused.applies(x):
            return fused.rms_norm(x, self.weight, self.eps)
        # One fused kernel that accumulates in fp32 for half-precision input (no fp32 copy of
        # x in memory), then Qwen2's cast-before-scale: `weight * normed.to(x.dtype)`.
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables (fp64, cast by `apply_rope`) for integer `positions` -> `[*shape, D]`."""
    inv_freq = 1.0 / (
        theta
        ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim)
    )
    freqs = positions.to(torch.float64)[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE. `x` is `[..., L, H, D]`; `cos`/`sin` broadcast as `[..., L, 1, D]`."""
    half = x.shape[-1] // 2
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if fused.applies(x):
            return self.down_proj(fused.silu_mul(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TimestepEmbedder(nn.Module):
    """DiT-style embedding of the raw flow time t in [0, 1]: a [cos, sin] sinusoid, then an MLP."""

    def __init__(self, hidden: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )

    def sinusoid(self, t: Tensor) -> Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(
            -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t.float()[..., None] * freqs
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: Tensor) -> Tensor:
        weight = self.mlp[0].weight
        return self.mlp(self.sinusoid(t).to(weight.dtype))


class PositionTable(nn.Module):
    """Holds the frozen 2-D sincos table `latent_pos_embed.pos_embed` stored in the checkpoint."""

    def __init__(self, num_positions: int, hidden: int) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(num_positions, hidden), requires_grad=False)

    def forward(self, ids: Tensor) -> Tensor:
        return self.pos_embed[ids]
