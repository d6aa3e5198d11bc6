"""What a checkpoint says about itself beyond its shapes: its name and its native image size
(the side it was trained at, which it draws best), from the optional `model_info.json`.

The published BAGEL-7B-MoT has no such file: its name is its directory's and its native size its
largest (1024, the size of its last training stage). Our checkpoint writers write the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bagel.network.config import BagelConfig, CheckpointError

MODEL_INFO_FILE = "model_info.json"


@dataclass(frozen=True)
class CheckpointFacts:
    name: str
    native_size: int  # pixels per side


def read_checkpoint_facts(model_dir: str | Path, config: BagelConfig) -> CheckpointFacts:
    """The facts of the checkpoint in `model_dir`; CheckpointError for a file that breaks them."""
    model_dir = Path(model_dir)
    path = model_dir / MODEL_INFO_FILE
    name = model_dir.resolve().name
    if not path.is_file():
        return CheckpointFacts(name, config.max_image_size)
    try:
        data = json.loads(path.read_text())
        name = str(data.get("model_name") or name)
        native = int(data.get("native_size", config.max_image_size))
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a model_info object: {e}") from None
    step = config.pixels_per_token
    if native <= 0 or native % step or native > config.max_image_size:
        raise CheckpointError(
            f"{path}: native_size={native} must be a positive multiple of {step} and at most "
            f"{config.max_image_size}"
        )
    return CheckpointFacts(name, native)


def write_checkpoint_facts(model_dir: str | Path, facts: CheckpointFacts) -> None:
    payload = {"model_name": facts.name, "native_size": facts.native_size}
    (Path(model_dir) / MODEL_INFO_FILE).write_text(json.dumps(payload, indent=2) + "\n")
