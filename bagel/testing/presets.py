"""`python -m bagel.testing.tiny DIR --preset 7b`: a full-size BAGEL-7B-MoT checkpoint with random
weights.

The published files, key names, shapes and dtype: `llm_config.json` (Qwen2.5-7B-Instruct),
`vit_config.json` (SigLIP so400m-14-980, 27 layers in the file, 26 in the weights),
`ema.safetensors` (14.6 B parameters, ~29 GB bf16: both experts, LM head, ViT, connector and every
table, one flat file as published: the loader reads no index), `ae.safetensors` (the FLUX VAE) and
the tokenizer files `bagel.testing.tiny` writes. For GPU benchmarks of speed and memory without the
real weights.

Random weights that keep bf16 forwards finite: every Linear draws N(0, 1/fan_in) (variance kept
through the layer), the projections that write into a residual stream are scaled by
1/sqrt(2 * layers) (GPT-2's init, `benchmarks.sp_gpu --init scaled`), norms are 1 (LayerNorm
biases 0), the position tables are the 2-D sincos tables the real file holds. Each tensor has its
own generator seeded from (seed, key), so the file does not depend on how many threads draw it;
a CUDA generator draws other numbers than a CPU one.

`ema.safetensors` is streamed: its header is known from the shapes, then each tensor is drawn by a
worker thread and written in order. At most `budget_bytes` of drawn tensors wait to be written,
so host memory stays near that budget (plus the largest tensor) whatever the checkpoint's size.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from torch import nn

from bagel.network.autoencoder import AutoEncoder, AutoEncoderParams
from bagel.network.config import BAGEL_7B_LLM, BagelConfig, LLMConfig
from bagel.network.layers import PositionTable, RMSNorm
from bagel.network.model import Bagel
from bagel.network.vit import ImageContextEncoder, ViTConfig
from bagel.testing.tokenizer import write_tiny_tokenizer

# SigLIP so400m-patch14 at 980 px as BAGEL runs it: 26 layers (the file says 27, see ViTConfig).
BAGEL_7B_VIT = ViTConfig(hidden_size=1152, intermediate_size=4304, num_heads=16, num_layers=26)

LM_HEAD = "language_model.lm_head.weight"
# Projections that add into a residual stream: scaled by 1/sqrt(2 * layers).
RESIDUAL_WRITERS = ("o_proj", "o_proj_moe_gen", "down_proj", "out_proj", "mlp.fc2")
BIAS_STD = 0.02
DEFAULT_BUDGET_BYTES = 8 << 30

Init = Literal["normal", "ones", "zeros", "sincos"]


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the file: its key, shape and how its values are drawn."""

    name: str
    shape: tuple[int, ...]
    init: Init
    std: float = 0.0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class CheckpointShape:
    """What a random checkpoint's files describe."""

    config: BagelConfig
    vit: ViTConfig

    @classmethod
    def bagel_7b(cls, num_layers: int | None = None) -> CheckpointShape:
        """BAGEL-7B-MoT; `num_layers` fewer decoder layers for a quick dry run (same widths)."""
        llm = BAGEL_7B_LLM if num_layers is None else replace(BAGEL_7B_LLM, num_layers=num_layers)
        return cls(BagelConfig(llm=llm, vae=AutoEncoderParams()), BAGEL_7B_VIT)


def llm_config_json(llm: LLMConfig) -> dict:
    """`llm_config.json` as BAGEL-7B-MoT ships it: Qwen2.5-7B-Instruct's config. BAGEL's own
    overrides (QK-norm, MoT layers) are set by its code, not stored in the file."""
    return {
        **llm.to_qwen2_json(),
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "max_window_layers": llm.num_layers,
        "use_cache": True,
    }


def vit_config_json(vit: ViTConfig) -> dict:
    """`vit_config.json`: SigLIP's config, which counts one layer more than the weights hold."""
    return {
        "model_type": "siglip_vision_model",
        "hidden_size": vit.hidden_size,
        "intermediate_size": vit.intermediate_size,
        "num_attention_heads": vit.num_heads,
        "num_hidden_layers": vit.num_layers + 1,
        "num_channels": vit.num_channels,
        "image_size": vit.image_size,
        "patch_size": vit.patch_size,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": vit.layer_norm_eps,
        "attention_dropout": 0.0,
    }


def _module_specs(module: nn.Module, residual_scale: float) -> Iterable[TensorSpec]:
    """The init of every parameter of `module` (built on the meta device), by module type."""
    for prefix, sub in module.named_modules():
        params = dict(sub.named_parameters(recurse=False))
        if not params:
            continue
        for name, p in params.items():
            key, shape = f"{prefix}.{name}", tuple(p.shape)
            if isinstance(sub, nn.Linear) and name == "weight":
                std = 1.0 / math.sqrt(sub.in_features)
                if prefix.endswith(RESIDUAL_WRITERS):
                    std *= residual_scale
                yield TensorSpec(key, shape, "normal", std)
            elif isinstance(sub, nn.Linear) and name == "bias":
                yield TensorSpec(key, shape, "normal", BIAS_STD)
            elif isinstance(sub, RMSNorm | nn.LayerNorm):
                yield TensorSpec(key, shape, "ones" if name == "weight" else "zeros")
            elif isinstance(sub, nn.Embedding):
                yield TensorSpec(key, shape, "normal", 1.0)
            elif isinstance(sub, PositionTable):
                yield TensorSpec(key, shape, "sincos")
            else:  # a new parameter type: decide its init here rather than guess
                raise TypeError(f"no random init for {key} ({type(sub).__name__})")


def ema_specs(shape: CheckpointShape) -> list[TensorSpec]:
    """Every tensor of `ema.safetensors`, sorted by key: the model both services load, the LM
    head, and the image-context encoder (ViT, connector, vit_pos_embed)."""
    config, llm = shape.config, shape.config.llm
    with torch.device("meta"):
        model = Bagel(config, with_gen=True)
        encoder = ImageContextEncoder(shape.vit, llm.hidden_size)
    specs = list(_module_specs(model, 1.0 / math.sqrt(2 * llm.num_layers)))
    specs += _module_specs(encoder, 1.0 / math.sqrt(2 * shape.vit.num_layers))
    specs.append(
        TensorSpec(LM_HEAD, (llm.vocab_size, llm.hidden_size), "normal", llm.hidden_size**-0.5)
    )
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError("two modules claim the same checkpoint key")
    return sorted(specs, key=lambda s: s.name)


def sincos_position_table(grid: int, dim: int) -> torch.Tensor:
    """MAE-style 2-D sincos table, `[grid*grid, dim]`: first half encodes the column, second the
    row, each half [sin, cos] with omega = 1/10000^(k/(dim/4))."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.flatten().double()[:, None] * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def tensor_seed(seed: int, name: str) -> int:
    """A tensor's own seed: its values depend on (seed, key) only, not on drawing order."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def draw(spec: TensorSpec, seed: int, device: torch.device) -> torch.Tensor:
    """The tensor of `spec` in bf16 on the CPU, drawn on `device`."""
    if spec.init == "sincos":
        grid = math.isqrt(spec.shape[0])
        if grid * grid != spec.shape[0]:
            raise ValueError(f"{spec.name}: {spec.shape[0]} positions are not a square grid")
        return sincos_position_table(grid, spec.shape[1]).to(torch.bfloat16)
    out = torch.empty(spec.shape, dtype=torch.bfloat16, device=device)
    if spec.init == "normal":
        generator = torch.Generator(device=device).manual_seed(tensor_seed(seed, spec.name))
        out.normal_(0.0, spec.std, generator=generator)
    else:
        out.fill_(1.0 if spec.init == "ones" else 0.0)
    return out.cpu()


_DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}


def safetensors_header(entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]]) -> bytes:
    """The 8-byte length and the JSON header of a safetensors file holding `entries` in this
    order, back to back, padded with spaces to 8 bytes as `safetensors` itself writes it."""
    header, offset = {}, 0
    for name, shape, dtype in entries:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": _DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_streamed(
    path: Path,
    specs: Sequence[TensorSpec],
    produce: Callable[[TensorSpec], torch.Tensor],
    *,
    workers: int,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    on_progress: Callable[[int, int], None] = lambda done, total: None,
) -> None:
    """Write the bf16 tensors of `specs` (in this order) to one safetensors file, each produced
    by `produce` on a pool of `workers` threads; at most `budget_bytes` of produced tensors wait
    to be written (always at least one). Written to `path` + ".partial", renamed when complete."""
    entries = [(s.name, s.shape, torch.bfloat16) for s in specs]
    total = sum(s.numel * 2 for s in specs)
    partial = path.with_name(path.name + ".partial")
    pending: deque[tuple[TensorSpec, Future]] = deque()
    waiting_bytes, written = 0, 0
    queue = iter(specs)
    following: TensorSpec | None = next(queue, None)
    try:
        with open(partial, "wb") as f, ThreadPoolExecutor(max(1, workers)) as pool:
            f.write(safetensors_header(entries))
            while pending or following is not None:
                while following is not None and (
                    not pending or waiting_bytes + following.numel * 2 <= budget_bytes
                ):
                    pending.append((following, pool.submit(produce, following)))
                    waiting_bytes += following.numel * 2
                    following = next(queue, None)
                spec, future = pending.popleft()
                tensor = future.result()
                if tuple(tensor.shape) != spec.shape or tensor.dtype != torch.bfloat16:
                    raise ValueError(f"{spec.name}: produced {tensor.dtype} {list(tensor.shape)}")
                f.write(tensor.contiguous().view(torch.int16).numpy().data)
                waiting_bytes -= spec.numel * 2
                written += spec.numel * 2
                del tensor, future
                on_progress(written, total)
    except BaseException:
        for _, future in pending:
            future.cancel()
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)


def _random_autoencoder(params: AutoEncoderParams, seed: int) -> dict[str, torch.Tensor]:
    """PyTorch's default init (kaiming-uniform convs, unit norms) from one seed, in bf16."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        autoencoder = AutoEncoder(params)
    return {k: v.to(torch.bfloat16).contiguous() for k, v in autoencoder.state_dict().items()}


def write_random_checkpoint(
    directory: str | Path,
    shape: CheckpointShape,
    *,
    seed: int = 0,
    device: str = "cpu",
    workers: int | None = None,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    log: Callable[[str], None] = lambda line: None,
) -> BagelConfig:
    """Write a checkpoint of `shape` with random weights into `directory` (see the module doc)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(directory)
    (directory / "llm_config.json").write_text(
        json.dumps(llm_config_json(shape.config.llm), indent=2)
    )
    (directory / "vit_config.json").write_text(json.dumps(vit_config_json(shape.vit), indent=2))
    save_file(_random_autoencoder(shape.config.vae, seed), directory / "ae.safetensors")

    specs = ema_specs(shape)
    target = torch.device(device)
    workers = workers or ((os.cpu_count() or 1) if target.type == "cpu" else 2)
    started = time.perf_counter()
    reported = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if done == total or now - reported[0] >= 5.0:
            reported[0] = now
            rate = done / max(now - started, 1e-9) / 1e9
            log(f"ema.safetensors: {done / 1e9:.1f} of {total / 1e9:.1f} GB ({rate:.2f} GB/s)")

    write_streamed(
        directory / "ema.safetensors",
        specs,
        lambda spec: draw(spec, seed, target),
        workers=workers,
        budget_bytes=budget_bytes,
        on_progress=progress,
    )
    return shape.config
