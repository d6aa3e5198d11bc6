"""BAGEL's image-context encoder: the SigLIP-NaViT vision tower, the connector MLP into the LLM's
hidden size, and the fixed 2-D sincos `vit_pos_embed` table, with the checkpoint's key names.

One image per call, non-causal attention over its patches. NaViT differs from plain SigLIP only
in its inputs: the patch embedding is a Linear over flattened (p, q, c) patches, and each patch
reads the learned position embedding at `row * max_patches_per_side + col` ("extrapolate" ids,
see `bagel.prompting.image_transforms.patchify_vit`), so any grid up to 70 x 70 works without
interpolation. Used only by the prefill service (image editing puts the input image in context).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from bagel.network.layers import PositionTable

VIT_CONFIG_FILE = "vit_config.json"


@dataclass(frozen=True)
class ViTConfig:
    """The SigLIP vision tower as BAGEL runs it (`vit_config.json` plus BAGEL's overrides)."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_layers: int
    patch_size: int = 14
    image_size: int = 980
    num_channels: int = 3
    layer_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_patches_per_side(self) -> int:
        """Side of the position grid: 980 // 14 = 70, BAGEL's `vit_max_num_patch_per_side`."""
        return self.image_size // self.patch_size

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.num_channels

    @classmethod
    def from_siglip_json(cls, data: dict) -> ViTConfig:
        """BAGEL drops the last layer: the file says 27 layers, `ema.safetensors` holds 0-25
        (the reference sets `num_hidden_layers -= 1`). It also turns 2-D RoPE off, which is
        what this module implements."""
        act = data.get("hidden_act", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise ValueError(f"hidden_act={act!r} is not supported (BAGEL uses gelu_pytorch_tanh)")
        config = cls(
            hidden_size=int(data["hidden_size"]),
            intermediate_size=int(data["intermediate_size"]),
            num_heads=int(data["num_attention_heads"]),
            num_layers=int(data["num_hidden_layers"]) - 1,
            patch_size=int(data.get("patch_size", 14)),
            image_size=int(data.get("image_size", 980)),
            num_channels=int(data.get("num_channels", 3)),
            layer_norm_eps=float(data.get("layer_norm_eps", 1e-6)),
        )
        if config.hidden_size % config.num_heads:
            raise ValueError(
                f"hidden {config.hidden_size} not divisible by {config.num_heads} heads"
            )
        return config

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ViTConfig:
        path = Path(model_dir) / VIT_CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {model_dir} a BAGEL checkpoint?")
        return cls.from_siglip_json(json.loads(path.read_text()))


class GeluMLP(nn.Module):
    """fc1, tanh-GELU, fc2: both SigLIP's MLP and BAGEL's `connector`."""

    def __init__(self, dim_in: int, dim_hidden: int, dim_out: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim_in, dim_hidden)
        self.fc2 = nn.Linear(dim_hidden, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        # Stored as a Linear [hidden, p*p*c]: the reference converts SigLIP's conv to it, with
        # the input flattened in (p, q, c) order.
        self.patch_embedding = nn.Linear(cfg.patch_dim, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_patches_per_side**2, cfg.hidden_size)

    def forward(self, patches: Tensor, position_ids: Tensor) -> Tensor:
        return self.patch_embedding(patches) + self.position_embedding(position_ids)


class VisionAttention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        dim = cfg.hidden_size
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """`[..., N, hidden]`: one image's patches, or a batch of same-sized images (training)."""

        def heads(t: Tensor) -> Tensor:
            return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(-3, -2)

        out = F.scaled_dot_product_attention(
            heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        )
        return self.out_proj(out.transpose(-3, -2).flatten(-2))


class VisionEncoderLayer(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = GeluMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class SiglipNaViT(nn.Module):
    """`vit_model.vision_model`: patches `[N, p*p*c]` and position ids `[N]` of one image to
    post-layernorm features `[N, hidden]` (or `[B, N, ...]` for a batch of same-sized images)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, patches: Tensor, position_ids: Tensor) -> Tensor:
        return self.post_layernorm(self.encoder(self.embeddings(patches, position_ids)))


class ImageContextEncoder(nn.Module):
    """ViT tokens as the LLM sees them: `connector(vit(patches)) + vit_pos_embed[position_ids]`.

    Submodule names give the checkpoint's keys: `vit_model.vision_model.*`, `connector.*`,
    `vit_pos_embed.pos_embed`.
    """

    def __init__(self, cfg: ViTConfig, llm_hidden_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.vit_model = nn.ModuleDict({"vision_model": SiglipNaViT(cfg)})
        self.connector = GeluMLP(cfg.hidden_size, llm_hidden_size, llm_hidden_size)
        self.vit_pos_embed = PositionTable(cfg.max_patches_per_side**2, llm_hidden_size)

    @property
    def vision_model(self) -> SiglipNaViT:
        return self.vit_model["vision_model"]

    def forward(self, patches: Tensor, position_ids: Tensor) -> Tensor:
        """`[N, p*p*c]` patches and `[N]` ids of one image to `[N, llm_hidden]` tokens."""
        if patches.ndim != 2 or patches.shape[1] != self.cfg.patch_dim:
            raise ValueError(
                f"patches must be [N, {self.cfg.patch_dim}], got {list(patches.shape)}"
            )
        if position_ids.shape != patches.shape[:1]:
            raise ValueError(
                f"position ids {list(position_ids.shape)} do not match {patches.shape[0]} patches"
            )
        features = self.vision_model(patches, position_ids)
        return self.connector(features) + self.vit_pos_embed(position_ids)
