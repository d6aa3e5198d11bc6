"""`python -m bagel.testing.tiny DIR [--seed S] [--preset tiny|7b]`: write a random BAGEL checkpoint
in the published format (`--preset 7b`: full size, see `bagel.testing.presets`).

Same file names, key names and dtypes as BAGEL-7B-MoT (`llm_config.json`, `vit_config.json`,
`ema.safetensors`, `ae.safetensors`, Qwen2 tokenizer files), random but deterministic weights, a
few MB. The ViT, connector and LM head are written (as in the real file) though text-to-image
never reads them; `bagel.network.vit.load_vit` reads the ViT and connector for image editing.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
from pathlib import Path

import torch
from safetensors.torch import save_file

from bagel.checkpoints.model_info import CheckpointFacts, write_checkpoint_facts
from bagel.network.autoencoder import AutoEncoder, AutoEncoderParams
from bagel.network.config import BagelConfig, LLMConfig
from bagel.network.layers import RMSNorm
from bagel.network.model import Bagel
from bagel.testing.presets import CheckpointShape, sincos_position_table, write_random_checkpoint
from bagel.testing.tokenizer import write_tiny_tokenizer

TINY_NATIVE_SIZE = 64
TINY_VIT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "layers_in_file": 1,
}


def tiny_config(vocab_size: int, num_heads: int = 8, num_kv_heads: int = 4) -> BagelConfig:
    """hidden 128, 4 layers, 8 query heads over 4 KV heads (Ulysses 2 and 4 valid), MLP 256.
    Fewer heads make them wider: 2 heads of 64 reach the FP8 attention kernel's head dims."""
    llm = LLMConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_layers=4,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
    )
    return BagelConfig(llm=llm, vae=AutoEncoderParams(ch=32))


def _randomise_norms(module: torch.nn.Module, generator: torch.Generator) -> None:
    # Default norm weights are all 1, which would hide a norm applied to the wrong tensor.
    for sub in module.modules():
        if isinstance(sub, RMSNorm | torch.nn.GroupNorm):
            sub.weight.data = 1.0 + 0.1 * torch.randn(sub.weight.shape, generator=generator)


def unused_tensors(config: BagelConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """LM head, SigLIP ViT, connector and ViT position table: present in the file, not read by
    text-to-image."""
    hidden, vit = config.llm.hidden_size, TINY_VIT["hidden_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "language_model.lm_head.weight": (config.llm.vocab_size, hidden),
        "connector.fc1.weight": (hidden, vit),
        "connector.fc1.bias": (hidden,),
        "connector.fc2.weight": (hidden, hidden),
        "connector.fc2.bias": (hidden,),
        "vit_pos_embed.pos_embed": (70 * 70, hidden),
        "vit_model.vision_model.embeddings.patch_embedding.weight": (vit, 14 * 14 * 3),
        "vit_model.vision_model.embeddings.patch_embedding.bias": (vit,),
        "vit_model.vision_model.embeddings.position_embedding.weight": (70 * 70, vit),
        "vit_model.vision_model.post_layernorm.weight": (vit,),
        "vit_model.vision_model.post_layernorm.bias": (vit,),
    }
    for i in range(TINY_VIT["layers_in_file"]):
        prefix = f"vit_model.vision_model.encoder.layers.{i}."
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{prefix}{norm}.weight"] = (vit,)
            shapes[f"{prefix}{norm}.bias"] = (vit,)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{prefix}self_attn.{proj}.weight"] = (vit, vit)
            shapes[f"{prefix}self_attn.{proj}.bias"] = (vit,)
        shapes[f"{prefix}mlp.fc1.weight"] = (TINY_VIT["intermediate_size"], vit)
        shapes[f"{prefix}mlp.fc1.bias"] = (TINY_VIT["intermediate_size"],)
        shapes[f"{prefix}mlp.fc2.weight"] = (vit, TINY_VIT["intermediate_size"])
        shapes[f"{prefix}mlp.fc2.bias"] = (vit,)
    tensors = {k: 0.02 * torch.randn(s, generator=generator) for k, s in shapes.items()}
    # Drawn above and replaced here, so the generator stream (and every later tensor) is unchanged:
    # LayerNorm weights near 1 (near 0 would flatten every activation) and, as in the real file,
    # the frozen sincos table for vit_pos_embed.
    for key, tensor in tensors.items():
        if key.startswith("vit_model.") and "norm" in key and key.endswith(".weight"):
            tensors[key] = 1.0 + 5.0 * tensor
    tensors["vit_pos_embed.pos_embed"] = sincos_position_table(70, hidden)
    return tensors


def tiny_vit_config_json() -> dict:
    # Like the real file, it claims one layer more than the checkpoint holds.
    return {
        "model_type": "siglip_vision_model",
        "hidden_size": TINY_VIT["hidden_size"],
        "intermediate_size": TINY_VIT["intermediate_size"],
        "num_attention_heads": TINY_VIT["num_attention_heads"],
        "num_hidden_layers": TINY_VIT["layers_in_file"] + 1,
        "num_channels": 3,
        "image_size": 980,
        "patch_size": 14,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
        "attention_dropout": 0.0,
    }


def write_tiny_checkpoint(
    directory: str | Path, seed: int = 0, num_heads: int = 8, num_kv_heads: int = 4
) -> BagelConfig:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokens = write_tiny_tokenizer(directory)
    config = tiny_config(64 * math.ceil(tokens / 64), num_heads, num_kv_heads)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    model = Bagel(config, with_gen=True)
    _randomise_norms(model, generator)
    model.latent_pos_embed.pos_embed.data = sincos_position_table(
        config.max_latent_size, config.llm.hidden_size
    )
    ema = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    ema.update({k: v.to(torch.bfloat16) for k, v in unused_tensors(config, generator).items()})
    save_file(ema, directory / "ema.safetensors")

    autoencoder = AutoEncoder(config.vae)
    _randomise_norms(autoencoder, generator)
    ae = {k: v.to(torch.bfloat16).contiguous() for k, v in autoencoder.state_dict().items()}
    save_file(ae, directory / "ae.safetensors")

    (directory / "llm_config.json").write_text(json.dumps(config.llm.to_qwen2_json(), indent=2))
    (directory / "vit_config.json").write_text(json.dumps(tiny_vit_config_json(), indent=2))
    # Random weights have no training size; a small default keeps an unsized request cheap.
    write_checkpoint_facts(directory, CheckpointFacts("bagel-tiny-random", TINY_NATIVE_SIZE))
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--preset",
        choices=("tiny", "7b"),
        default="tiny",
        help="tiny: a few MB for tests (default); 7b: BAGEL-7B-MoT's full shapes, ~29 GB",
    )
    parser.add_argument(
        "--layers", type=int, default=None, help="7b only: fewer decoder layers, same widths"
    )
    parser.add_argument(
        "--device", default="cpu", help="7b only: draw the weights on this device (e.g. cuda)"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="7b only: threads drawing tensors"
    )
    args = parser.parse_args()
    if args.preset == "tiny":
        if args.layers is not None or args.device != "cpu" or args.workers is not None:
            parser.error("--layers, --device and --workers apply to --preset 7b only")
        config = write_tiny_checkpoint(args.directory, args.seed)
    else:
        if args.layers is not None and args.layers < 1:
            parser.error("--layers must be positive")
        config = write_random_checkpoint(
            args.directory,
            CheckpointShape.bagel_7b(args.layers),
            seed=args.seed,
            device=args.device,
            workers=args.workers,
            log=lambda line: print(line, flush=True),
        )
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB
        print(f"peak host memory (max RSS) {peak_gib:.1f} GiB")
    print(
        f"wrote {args.preset} BAGEL checkpoint to {args.directory} "
        f"(fingerprint {config.fingerprint()})"
    )


if __name__ == "__main__":
    main()
