"""The FLUX.1 autoencoder (encoder and decoder) that BAGEL uses for its image latents, in plain
PyTorch, with module names chosen so that `state_dict()` keys equal those of `ae.safetensors`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

GROUPNORM_GROUPS = 32


@dataclass(frozen=True)
class AutoEncoderParams:
    """FLUX.1 `ae.safetensors` hyperparameters; only `ch` differs for the tiny test checkpoint."""

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    def __post_init__(self) -> None:
        # Accept a list (e.g. from JSON) but store a tuple so the dataclass stays hashable.
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        if not self.ch_mult:
            raise ValueError("ch_mult must not be empty")
        widths = [self.ch * m for m in (1, *self.ch_mult)]
        bad = sorted({w for w in widths if w % GROUPNORM_GROUPS})
        if bad:
            raise ValueError(
                f"AutoEncoderParams(ch={self.ch}, ch_mult={self.ch_mult}) gives channel counts "
                f"{bad} that GroupNorm({GROUPNORM_GROUPS}) cannot split into groups"
            )

    @property
    def downsample(self) -> int:
        """Pixels per latent pixel along each side (8 for FLUX)."""
        return 2 ** (len(self.ch_mult) - 1)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPNORM_GROUPS, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.nin_shortcut = None

    def forward(self, x: Tensor) -> Tensor:
        # The activations are taken in place and the residual added into `h`: at 1024² the
        # decoder's last levels hold 256 x 1024 x 1024 maps (512 MiB in bf16 each), and every
        # such map not allocated lowers the decode's peak, which is the diffusion rank's peak.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return h.add_(x)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)

        def heads(t: Tensor) -> Tensor:  # [b, c, h, w] -> [b, 1, h*w, c]
            return t.reshape(b, 1, c, h * w).transpose(-1, -2)

        q, k, v = heads(self.q(normed)), heads(self.k(normed)), heads(self.v(normed))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # FLUX pads only right and bottom, so the stride-2 conv sees the top-left pixel first.
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class DownLevel(nn.Module):
    """One encoder resolution (`encoder.down.i`): res blocks, then an optional 2x downsample."""

    def __init__(self, blocks: list[ResnetBlock], downsample: Downsample | None) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class UpLevel(nn.Module):
    """One decoder resolution (`decoder.up.i`): res blocks, then an optional 2x upsample."""

    def __init__(self, blocks: list[ResnetBlock], upsample: Upsample | None) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.upsample = upsample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    """Image [B, 3, H, W] in [-1, 1] -> [B, 2*z_channels, H/8, W/8] (mean and log-variance)."""

    def __init__(self, params: AutoEncoderParams) -> None:
        super().__init__()
        ch, ch_mult = params.ch, params.ch_mult
        self.conv_in = nn.Conv2d(params.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for i, mult in enumerate(ch_mult):
            block_out = ch * mult
            blocks = []
            for _ in range(params.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            last = i == len(ch_mult) - 1
            self.down.append(DownLevel(blocks, None if last else Downsample(block_in)))
        self.mid = MidBlock(block_in)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * params.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, z_channels, h, w] (unscaled) -> image [B, 3, 8h, 8w], roughly in [-1, 1]."""

    def __init__(self, params: AutoEncoderParams) -> None:
        super().__init__()
        ch, ch_mult = params.ch, params.ch_mult
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(params.z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in)
        # Built from the lowest resolution up, but indexed like the checkpoint: up.0 is the
        # highest resolution, so the list is filled back to front.
        levels: list[UpLevel] = []
        for i in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[i]
            blocks = []
            for _ in range(params.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            levels.insert(0, UpLevel(blocks, Upsample(block_in) if i != 0 else None))
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, params.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class AutoEncoder(nn.Module):
    """The FLUX.1 VAE: `encode` maps images to BAGEL's scaled latents, `decode` maps them back."""

    def __init__(self, params: AutoEncoderParams) -> None:
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)

    def encode(
        self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Image [B, 3, H, W] in [-1, 1] -> scaled latent [B, z, H/8, W/8].

        The posterior mean by default; `sample=True` draws from the diagonal Gaussian as the
        reference does (pass a generator for reproducibility)."""
        moments = self.encoder(x)
        mean, logvar = moments.chunk(2, dim=1)
        z = mean
        if sample:
            noise = torch.randn(
                mean.shape, generator=generator, device=mean.device, dtype=mean.dtype
            )
            z = mean + torch.exp(0.5 * logvar) * noise
        return self.params.scale_factor * (z - self.params.shift_factor)

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latent [B, z, h, w] -> image [B, 3, 8h, 8w], nominally in [-1, 1], not clamped."""
        return self.decoder(z / self.params.scale_factor + self.params.shift_factor)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


def to_rgb(x: Tensor) -> np.ndarray:
    """A decoded image [1, 3, H, W] (or [3, H, W]) in [-1, 1] -> uint8 RGB pixels `[H, W, 3]`."""
    if x.dim() == 4:
        if x.shape[0] != 1:
            raise ValueError(f"to_rgb takes one image, got a batch of {x.shape[0]}")
        x = x[0]
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(
            f"expected an image of shape [1, 3, H, W] or [3, H, W], got {list(x.shape)}"
        )
    # Truncate to uint8 as BAGEL's decode_image does, but scale in fp32: bf16 cannot hold 255
    # steps between 0.5 and 1 exactly.
    pixels = torch.clamp(x.detach().float() * 0.5 + 0.5, 0.0, 1.0) * 255.0
    return np.ascontiguousarray(pixels.to(torch.uint8).permute(1, 2, 0).cpu().numpy())
