"""Building blocks of the Qwen2-MoT decoder: RMSNorm, rotary embedding, the SwiGLU MLP, the
timestep embedder, and one expert's attention projections."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bagel.kernels import fused


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


def add_linear(residual: Tensor, linear: nn.Module, x: Tensor) -> Tensor:
    """`residual + linear(x)`. For a bias-free `nn.Linear` of the residual's dtype the add
    rides in the matmul (`addmm`: the GEMM's epilogue reads the residual), which saves a pass
    over the hidden states and rounds the sum once instead of twice."""
    if (
        type(linear) is nn.Linear
        and linear.bias is None
        and residual.dtype == x.dtype == linear.weight.dtype
    ):
        width = residual.shape[-1]
        rows = x.reshape(-1, x.shape[-1])
        return torch.addmm(residual.reshape(-1, width), rows, linear.weight.t()).view(
            residual.shape
        )
    return residual + linear(x)


def pack_linears(linears: Sequence[nn.Linear]) -> tuple[Tensor, Tensor | None]:
    """The weights (and biases, when they have them) of `linears` stacked along the output dim,
    one tensor each; each linear is left viewing its rows of them, so nothing is held twice.
    One GEMM over the packed weight equals the linears' outputs side by side: for a few rows
    (text decoding) each separate GEMM streams its weights with a launch of its own."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    biased = all(lin.bias is not None for lin in linears)
    bias = torch.cat([lin.bias.detach() for lin in linears]) if biased else None
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight = nn.Parameter(weight[start : start + rows], requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias[start : start + rows], requires_grad=False)
        start += rows
    return weight, bias


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self._gate_up: Tensor | None = None  # `packed_gate_up`

    def packed_gate_up(self) -> Tensor:
        """The gate and up weights as one `[2 * intermediate, hidden]` tensor (`pack_linears`;
        pack after the model has moved to its device)."""
        if self._gate_up is None:
            self._gate_up = pack_linears([self.gate_proj, self.up_proj])[0]
        return self._gate_up

    def activation(self, x: Tensor, packed: bool = False) -> Tensor:
        """`silu(gate_proj(x)) * up_proj(x)`, the input of `down_proj`; with `packed`, both
        projections as one GEMM over `packed_gate_up` (for few rows: each output is the same
        dot product, the GEMM may split it differently)."""
        if packed:
            gate, up = F.linear(x, self.packed_gate_up()).chunk(2, dim=-1)
            if fused.applies(gate):  # reads the two halves in place
                return fused.silu_mul(gate, up)
            return F.silu(gate) * up
        gate = self.gate_proj(x)
        if fused.applies(gate):  # written over `gate`: one buffer of the width fewer at peak
            return fused.silu_mul(gate, self.up_proj(x), out=gate)
        return F.silu(gate) * self.up_proj(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.activation(x))

    def add_to(self, residual: Tensor, x: Tensor, packed: bool = False) -> Tensor:
        """`residual + self(x)`, the add folded into `down_proj` (`add_linear`); `packed` as for
        `activation`."""
        return add_linear(residual, self.down_proj, self.activation(x, packed))


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


class TokenRows(nn.Module):
    """A token embedding table that holds only some tokens' rows.

    The generation side embeds just the two image markers; BAGEL-7B's full table is 152,064 rows
    (1 GiB in bf16) that a diffusion rank would otherwise keep for nothing. Looking up a token
    it does not hold is an error the caller checks with `holds` where the ids are chosen: the
    lookup itself runs inside captured graphs, where it cannot raise.
    """

    def __init__(self, table: Tensor, token_ids: Sequence[int]) -> None:
        """Keeps `table`'s rows `token_ids` (a meta `table` gives meta rows, to be loaded; the
        ids themselves always live on a real device: the table's, or the CPU for meta)."""
        super().__init__()
        ids = sorted(set(token_ids))
        if not ids or ids[0] < 0 or ids[-1] >= table.shape[0]:
            raise ValueError(f"token ids {ids} are not rows of a {table.shape[0]}-token table")
        self.token_ids = tuple(ids)
        index = torch.tensor(ids, device="cpu" if table.is_meta else table.device)
        self.weight = nn.Parameter(table[index.to(table.device)], requires_grad=False)
        self.register_buffer("sorted_ids", index, persistent=False)

    def holds(self, token_ids: Sequence[int]) -> bool:
        return set(token_ids) <= set(self.token_ids)

    def forward(self, ids: Tensor) -> Tensor:
        return self.weight[torch.searchsorted(self.sorted_ids, ids)]


class PositionTable(nn.Module):
    """Holds the frozen 2-D sincos table `latent_pos_embed.pos_embed` stored in the checkpoint."""

    def __init__(self, num_positions: int, hidden: int) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(num_positions, hidden), requires_grad=False)

    def forward(self, ids: Tensor) -> Tensor:
        return self.pos_embed[ids]
