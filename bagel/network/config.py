"""Model configuration: the Qwen2 fields read from `llm_config.json`, BAGEL's overrides, the
latent/VAE geometry, and a stable fingerprint both services put on the wire."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safetensors import safe_open

from bagel.network.autoencoder import AutoEncoderParams

AE_FILE = "ae.safetensors"


class CheckpointError(ValueError):
    """The file does not hold what the model expects; the message lists every fault."""


@dataclass(frozen=True)
class LLMConfig:
    """The Qwen2 decoder shape. BAGEL always uses QK-norm, MoT layers and untied embeddings."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_qwen2_json(cls, data: dict) -> LLMConfig:
        if data.get("rope_scaling"):
            raise ValueError(f"rope_scaling={data['rope_scaling']!r} is not supported")
        config = cls(
            vocab_size=int(data["vocab_size"]),
            hidden_size=int(data["hidden_size"]),
            intermediate_size=int(data["intermediate_size"]),
            num_layers=int(data["num_hidden_layers"]),
            num_heads=int(data["num_attention_heads"]),
            num_kv_heads=int(data.get("num_key_value_heads", data["num_attention_heads"])),
            rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)),
            rope_theta=float(data.get("rope_theta", 1e6)),
            max_position_embeddings=int(data.get("max_position_embeddings", 32768)),
        )
        if config.hidden_size % config.num_heads or config.num_heads % config.num_kv_heads:
            raise ValueError(
                f"heads do not divide: hidden {config.hidden_size}, heads {config.num_heads}, "
                f"kv heads {config.num_kv_heads}"
            )
        return config

    def to_qwen2_json(self) -> dict:
        """The `llm_config.json` fields, as the published checkpoint spells them."""
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": False,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "sliding_window": 131072,
            "use_sliding_window": False,
            "torch_dtype": "bfloat16",
        }


# Qwen2.5-7B-Instruct, which is what BAGEL-7B-MoT's llm_config.json holds.
BAGEL_7B_LLM = LLMConfig(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_layers=28,
    num_heads=28,
    num_kv_heads=4,
)


@dataclass(frozen=True)
class BagelConfig:
    """Everything the text-to-image path needs to know about the checkpoint's shape."""

    llm: LLMConfig
    vae: AutoEncoderParams = field(default_factory=AutoEncoderParams)
    latent_patch_size: int = 2
    max_latent_size: int = 64
    timestep_embed_dim: int = 256

    @property
    def patch_dim(self) -> int:
        """Features per latent token: p * p * z_channels (64 for BAGEL)."""
        return self.latent_patch_size**2 * self.vae.z_channels

    @property
    def pixels_per_token(self) -> int:
        """Image pixels per latent token side: VAE downsampling times the patch size (16)."""
        return self.vae.downsample * self.latent_patch_size

    @property
    def max_image_size(self) -> int:
        return self.max_latent_size * self.pixels_per_token

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of latent tokens of a `height x width` image."""
        return height // self.pixels_per_token, width // self.pixels_per_token

    def fingerprint(self) -> str:
        """A stable hash of the configuration: two processes with the same checkpoint shape agree."""
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> BagelConfig:
        """Read `llm_config.json`; take the VAE width from `ae.safetensors` (the real checkpoint has
        no VAE config file: FLUX's values are fixed, only our tiny test checkpoint is narrower)."""
        model_dir = Path(model_dir)
        llm_path = model_dir / "llm_config.json"
        if not llm_path.is_file():
            raise FileNotFoundError(f"{llm_path} not found: is {model_dir} a BAGEL checkpoint?")
        llm = LLMConfig.from_qwen2_json(json.loads(llm_path.read_text()))
        return cls(llm=llm, vae=read_autoencoder_params(model_dir / AE_FILE))


BAGEL_7B = BagelConfig(llm=BAGEL_7B_LLM)


def read_autoencoder_params(path: Path) -> AutoEncoderParams:
    """FLUX's fixed parameters, with the base width and latent channels read from tensor shapes
    (the published file has no config; our tiny test checkpoint is narrower)."""
    if not path.is_file():
        raise FileNotFoundError(f"autoencoder file {path} not found")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        try:
            ch = f.get_slice("decoder.conv_out.weight").get_shape()[1]
            z_channels = f.get_slice("decoder.conv_in.weight").get_shape()[1]
        except Exception as exc:  # noqa: BLE001 - any lookup failure means the same thing
            raise CheckpointError(f"{path.name} lacks the FLUX decoder tensors: {exc}") from exc
    levels = 1 + max(int(k.split(".")[2]) for k in keys if k.startswith("decoder.up."))
    blocks = 1 + max(int(k.split(".")[4]) for k in keys if k.startswith("decoder.up.0.block."))
    default = AutoEncoderParams()
    ch_mult = default.ch_mult if levels == len(default.ch_mult) else tuple(default.ch_mult[:levels])
    return AutoEncoderParams(
        ch=ch, z_channels=z_channels, ch_mult=ch_mult, num_res_blocks=blocks - 1
    )
