"""`python -m bagel.checkpoints.check_checkpoint DIR`: whether DIR holds a complete BAGEL
checkpoint, naming every missing or unreadable file and every missing, unexpected or mis-shaped
tensor.

Only the files' headers are read (the models are built on the meta device), so checking the
29 GB BAGEL-7B-MoT takes about a second. Both services run `checkpoint_faults` at start-up.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from bagel.checkpoints.checkpoint import EMA_FILE, is_gen_only
from bagel.checkpoints.model_info import read_checkpoint_facts
from bagel.network.autoencoder import AutoEncoder
from bagel.network.config import (
    AE_FILE,
    BagelConfig,
    CheckpointError,
    LLMConfig,
    read_autoencoder_params,
)
from bagel.network.model import Bagel
from bagel.network.vit import VIT_CONFIG_FILE, ImageContextEncoder, ViTConfig

LLM_CONFIG_FILE = "llm_config.json"
LM_HEAD_KEY = "language_model.lm_head.weight"  # in the file; read only to decode text
# Qwen2's tokenizer: tokenizer.json, or the BPE pair; tokenizer_config.json beside either.
TOKENIZER_FILES = ("tokenizer.json", ("vocab.json", "merges.txt"))

Shapes = dict[str, tuple[int, ...]]


def checkpoint_faults(model_dir: str | Path, *, with_gen: bool = True) -> list[str]:
    """Every fault of the checkpoint in `model_dir`, one line each (empty: complete).
    `with_gen=False` leaves out the generation expert's tensors (a text-only prefill)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return [f"{model_dir} is not a directory"]
    faults = _missing_files(model_dir)
    llm = _read_json(model_dir / LLM_CONFIG_FILE, LLMConfig.from_qwen2_json, faults)
    vit = _read_json(model_dir / VIT_CONFIG_FILE, ViTConfig.from_siglip_json, faults)
    ae_path = model_dir / AE_FILE
    if ae_path.is_file():
        try:
            ae_params = read_autoencoder_params(ae_path)
        except Exception as e:  # noqa: BLE001 - a broken file is a fault to report, not a crash
            faults.append(f"{AE_FILE}: {_one_line(e)}")
        else:
            faults += _tensor_faults(ae_path, _shapes(lambda: AutoEncoder(ae_params)))
            if llm is not None:
                expected = _ema_shapes(BagelConfig(llm=llm, vae=ae_params), vit, with_gen)
                ema_path = model_dir / EMA_FILE
                if ema_path.is_file():
                    faults += _tensor_faults(ema_path, expected)
    return faults


def model_dir_fault(
    model_dir: str | Path, *, with_gen: bool = True, flag: str = "--model"
) -> str | None:
    """One line naming the checkpoint's first fault (and how to list them all), or None. The
    checkpoint facts (`bagel.checkpoints.model_info`) are checked too."""
    faults = checkpoint_faults(model_dir, with_gen=with_gen)
    if not faults:
        try:
            read_checkpoint_facts(model_dir, BagelConfig.from_dir(model_dir))
        except CheckpointError as e:
            faults = [str(e)]
    if not faults:
        return None
    more = f" (and {len(faults) - 1} more)" if len(faults) > 1 else ""
    return (
        f"{flag} {model_dir}: {faults[0]}{more}; list them all with "
        f"`python -m bagel.checkpoints.check_checkpoint {model_dir}`"
    )


def _missing_files(model_dir: Path) -> list[str]:
    faults = [
        f"missing file: {model_dir / name}"
        for name in (LLM_CONFIG_FILE, VIT_CONFIG_FILE, EMA_FILE, AE_FILE)
        if not (model_dir / name).is_file()
    ]
    single, pair = TOKENIZER_FILES
    if not (model_dir / single).is_file() and not all((model_dir / n).is_file() for n in pair):
        faults.append(
            f"missing file: {model_dir / single} (or {' + '.join(pair)}): no Qwen2 tokenizer"
        )
    return faults


def _read_json(path: Path, parse: Callable[[dict], object], faults: list[str]):
    if not path.is_file():
        return None
    try:
        return parse(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        what = f"lacks key {e}" if isinstance(e, KeyError) else _one_line(e)
        faults.append(f"{path.name}: {what}")
        return None


def _shapes(build: Callable[[], torch.nn.Module]) -> Shapes:
    with torch.device("meta"):
        module = build()
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


def _ema_shapes(config: BagelConfig, vit: ViTConfig | None, with_gen: bool) -> Shapes:
    """The tensors `ema.safetensors` must hold: the language model with its generation expert,
    the LM head, and the image-context encoder (when its config could be read)."""
    shapes = _shapes(lambda: Bagel(config, with_gen=with_gen))
    if not with_gen:
        shapes = {k: v for k, v in shapes.items() if not is_gen_only(k)}
    shapes[LM_HEAD_KEY] = (config.llm.vocab_size, config.llm.hidden_size)
    if vit is not None:
        shapes |= _shapes(lambda: ImageContextEncoder(vit, config.llm.hidden_size))
    return shapes


def _tensor_faults(path: Path, expected: Mapping[str, tuple[int, ...]]) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad header
        return [f"{path.name}: not a readable safetensors file: {_one_line(e)}"]
    faults = [f"{path.name}: missing key {k}" for k in sorted(expected.keys() - found.keys())]
    faults += [
        f"{path.name}: wrong shape of {k}: file {list(found[k])}, expected {list(expected[k])}"
        for k in sorted(expected.keys() & found.keys())
        if found[k] != expected[k]
    ]
    return faults


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bagel.checkpoints.check_checkpoint",
        description="Check that DIR holds a complete BAGEL checkpoint (files, configs, tensor "
        "names and shapes); names every fault. Exit status 0: complete, 1: faults found.",
    )
    parser.add_argument("model_dir", metavar="DIR")
    args = parser.parse_args(argv)
    faults = checkpoint_faults(args.model_dir)
    for fault in faults:
        print(fault)
    if faults:
        print(f"{args.model_dir}: {len(faults)} fault(s)", file=sys.stderr)
        return 1
    config = BagelConfig.from_dir(args.model_dir)
    llm = config.llm
    print(
        f"{args.model_dir}: a complete BAGEL checkpoint ({llm.num_layers} layers, hidden "
        f"{llm.hidden_size}, vocabulary {llm.vocab_size}; images up to {config.max_image_size} px)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
