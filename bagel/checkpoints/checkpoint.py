"""Loading the published BAGEL-7B-MoT files (`ema.safetensors`, `ae.safetensors`) into our modules.

Tensors are read one at a time from the memory-mapped file and converted straight to the target
dtype and device, so a 14.6 B-parameter bf16 file never becomes a full fp32 copy. Only the
tensors a role needs are read; every missing, unexpected or mis-shaped key is reported at once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from torch import nn

from bagel.network.autoencoder import AutoEncoder, AutoEncoderParams
from bagel.network.config import (
    AE_FILE,
    BagelConfig,
    CheckpointError,
    LLMConfig,
    read_autoencoder_params,
)
from bagel.network.fp8 import (
    LINEAR_PRECISIONS,
    LinearPrecision,
    quantized_weight_names,
    state_quantizer,
    use_fp8_linears,
)
from bagel.network.model import Bagel
from bagel.network.vit import ImageContextEncoder, ViTConfig

Role = Literal["prefill", "diffusion"]

EMA_FILE = "ema.safetensors"
EMBED_KEY = "language_model.model.embed_tokens.weight"

# In the file, never needed for text-to-image.
UNUSED_PREFIXES = ("vit_model.", "connector.", "vit_pos_embed.", "language_model.lm_head.")
# The image-context encoder (image editing, prefill only).
VIT_PREFIXES = ("vit_model.", "connector.", "vit_pos_embed.")
# Needed only by the generation path.
GEN_ONLY_PREFIXES = ("time_embedder.", "vae2llm.", "llm2vae.", "latent_pos_embed.")


def is_gen_only(key: str) -> bool:
    return key.startswith(GEN_ONLY_PREFIXES) or "_moe_gen." in key


LM_HEAD_KEY = "language_model.lm_head.weight"


def ema_keys_for(role: Role, lm_head: bool = False) -> Callable[[str], bool]:
    """Which `ema.safetensors` keys a role reads (`lm_head`: also the LM head, to decode text)."""

    def wanted(key: str) -> bool:
        if lm_head and key == LM_HEAD_KEY:
            return True
        if key.startswith(UNUSED_PREFIXES):
            return False
        return role == "diffusion" or not is_gen_only(key)

    return wanted


def load_state(
    module: nn.Module,
    path: Path,
    wanted: Callable[[str], bool],
    dtype: torch.dtype,
    device: torch.device | str,
    convert: Callable[[str, torch.Tensor], dict[str, torch.Tensor]] | None = None,
    restructure: Callable[[nn.Module], object] | None = None,
    rows: Mapping[str, Sequence[int]] | None = None,
) -> None:
    """Fill `module` (typically built on the meta device) from the wanted keys of `path`.

    Keys are checked against `module` as built. With `convert`, each tensor becomes, as soon as
    it is read, the tensors `restructure(module)` holds in its place (FP8 weights and their
    scales: `bagel.network.fp8`), so no full-precision copy of the whole state is ever held. Of a
    key in `rows` only those rows (sorted) leave the file; `restructure` shrinks the module to
    match.
    """
    rows = rows or {}
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} not found")
    if not os.access(path, os.R_OK):  # safetensors would say "No such file or directory"
        raise PermissionError(f"checkpoint file {path} is not readable by this user")
    with safe_open(str(path), framework="pt") as f:
        file_keys = {k for k in f.keys() if wanted(k)}  # noqa: SIM118 - safe_open is not a dict
        missing = sorted(expected.keys() - file_keys)
        unexpected = sorted(file_keys - expected.keys())
        misshaped = []
        for name in sorted(expected.keys() & file_keys):
            shape = tuple(f.get_slice(name).get_shape())
            if shape != expected[name]:
                misshaped.append(f"{name}: file {list(shape)}, model {list(expected[name])}")
        if missing or unexpected or misshaped:
            lines = [f"{path.name} does not match the model:"]
            lines += [f"  missing key: {k}" for k in missing]
            lines += [f"  unexpected key: {k}" for k in unexpected]
            lines += [f"  wrong shape: {s}" for s in misshaped]
            raise CheckpointError("\n".join(lines))
        state: dict[str, torch.Tensor] = {}
        for name in expected:
            if name in rows:
                table = f.get_slice(name)
                tensor = torch.cat([table[r : r + 1] for r in sorted(set(rows[name]))])
            else:
                tensor = f.get_tensor(name)
            tensor = tensor.to(device=device, dtype=dtype)
            state.update(convert(name, tensor) if convert else {name: tensor})
    if restructure is not None:
        restructure(module)
    module.load_state_dict(state, strict=True, assign=True)
    module.requires_grad_(False)
    module.eval()


def load_bagel(
    model_dir: str | Path,
    role: Role,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    config: BagelConfig | None = None,
    linear_precision: LinearPrecision = "bf16",
    token_rows: Sequence[int] | None = None,
    lm_head: bool = False,
) -> Bagel:
    """The language model and generation heads a role needs, from `ema.safetensors`.

    `linear_precision="fp8"` (diffusion role only) quantizes the decoder's linear weights to
    e4m3 as they are read (`bagel.network.fp8`); "bf16" keeps every weight in `dtype`. `token_rows`
    keeps only those rows of the token embedding table (`TokenRows`): a diffusion rank embeds
    the two image markers and nothing else, and need not hold 1 GiB of vocabulary. `lm_head`
    also loads the LM head, which text decoding (understanding, chat, think) needs.
    """
    if linear_precision not in LINEAR_PRECISIONS:
        raise ValueError(f"linear precision {linear_precision!r}: one of {LINEAR_PRECISIONS}")
    model_dir = Path(model_dir)
    config = config or BagelConfig.from_dir(model_dir)
    with torch.device("meta"):
        model = Bagel(config, with_gen=role == "diffusion", with_lm_head=lm_head)
    convert = restructure = None
    if linear_precision == "fp8":
        if role != "diffusion":
            raise ValueError("FP8 linear layers are for the diffusion role")
        convert, restructure = state_quantizer(quantized_weight_names(model)), use_fp8_linears
    rows = {}
    if token_rows is not None:
        rows = {EMBED_KEY: token_rows}
        restructure = shrink_embeddings(token_rows, device, then=restructure)
    load_state(
        model,
        model_dir / EMA_FILE,
        ema_keys_for(role, lm_head),
        dtype,
        device,
        convert,
        restructure,
        rows,
    )
    return model


def shrink_embeddings(
    token_rows: Sequence[int],
    device: torch.device | str,
    then: Callable[[nn.Module], object] | None = None,
) -> Callable[[Bagel], None]:
    """A `restructure` for `load_state` that keeps `token_rows` of the embedding table, then
    applies `then`."""

    def restructure(model: Bagel) -> None:
        model.language_model.model.keep_token_rows(token_rows, device)
        if then is not None:
            then(model)

    return restructure


def load_autoencoder(
    model_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    params: AutoEncoderParams | None = None,
) -> AutoEncoder:
    """The FLUX autoencoder from `ae.safetensors` (both halves: the encoder is small)."""
    model_dir = Path(model_dir)
    params = params or read_autoencoder_params(model_dir / AE_FILE)
    with torch.device("meta"):
        ae = AutoEncoder(params)
    load_state(ae, model_dir / AE_FILE, lambda key: True, dtype, device)
    if torch.device(device).type == "cuda":
        # cuDNN's NHWC kernels: an NCHW decode transposes the 256-channel 1024² maps in and out
        # of each convolution, which makes the decode the diffusion rank's memory peak
        # (`python -m benchmarks.decode_memory`).
        ae = ae.to(memory_format=torch.channels_last)
    return ae


def load_vit(
    model_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    config: ViTConfig | None = None,
) -> ImageContextEncoder:
    """The SigLIP-NaViT tower, `connector` and `vit_pos_embed` from `ema.safetensors`."""
    model_dir = Path(model_dir)
    config = config or ViTConfig.from_dir(model_dir)
    llm_path = model_dir / "llm_config.json"
    if not llm_path.is_file():
        raise FileNotFoundError(f"{llm_path} not found: is {model_dir} a BAGEL checkpoint?")
    llm = LLMConfig.from_qwen2_json(json.loads(llm_path.read_text()))
    with torch.device("meta"):
        encoder = ImageContextEncoder(config, llm.hidden_size)
    load_state(
        encoder, model_dir / EMA_FILE, lambda key: key.startswith(VIT_PREFIXES), dtype, device
    )
    return encoder
