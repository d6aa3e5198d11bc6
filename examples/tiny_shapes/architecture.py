"""BAGEL's architecture at the size of this task, and the starting weights of a training run.

The language model is the same Qwen2 Mixture-of-Transformers (und and gen experts, QK-norm, both
final norms) and the autoencoder the same FLUX layout (downsample 8), only narrower: 128x128
images become 16x16x8 latents, 64 latent tokens of 32 features.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bagel.network.autoencoder import AutoEncoderParams
from bagel.network.config import BagelConfig, LLMConfig
from bagel.network.model import Bagel
from bagel.testing.tiny import sincos_position_table

HIDDEN = 256
LAYERS = 4
HEADS = 8
KV_HEADS = 4  # Ulysses degrees 2 and 4 divide it
MLP = 512
AE_PARAMS = AutoEncoderParams(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=1, z_channels=8)


def shapes_config(vocab_size: int) -> BagelConfig:
    """`vocab_size` is the tokenizer's, rounded up to a multiple of 64 (as `bagel.testing.tiny`
    does)."""
    llm = LLMConfig(
        vocab_size=64 * math.ceil(vocab_size / 64),
        hidden_size=HIDDEN,
        intermediate_size=MLP,
        num_layers=LAYERS,
        num_heads=HEADS,
        num_kv_heads=KV_HEADS,
    )
    return BagelConfig(llm=llm, vae=AE_PARAMS)


def init_bagel(config: BagelConfig, seed: int) -> Bagel:
    """GPT-2-style starting weights in the language model (N(0, 0.02), residual outputs scaled
    down by the depth), PyTorch's defaults in the input heads (so that the latents are not drowned
    by the unit-sized position table), a zero velocity head, and the fixed 2-D sincos table."""
    torch.manual_seed(seed)
    model = Bagel(config, with_gen=True)
    residual_std = 0.02 / math.sqrt(2 * config.llm.num_layers)
    for name, module in model.language_model.named_modules():
        if isinstance(module, nn.Linear):
            residual = name.endswith(("o_proj", "o_proj_moe_gen", "down_proj"))
            nn.init.normal_(module.weight, std=residual_std if residual else 0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
    nn.init.zeros_(model.llm2vae.weight)
    nn.init.zeros_(model.llm2vae.bias)
    model.latent_pos_embed.pos_embed.data = sincos_position_table(
        config.max_latent_size, config.llm.hidden_size
    )
    return model
