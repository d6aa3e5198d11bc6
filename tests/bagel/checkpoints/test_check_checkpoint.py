"""`python -m bagel.checkpoints.check_checkpoint DIR` names exactly which file or key is missing or
mis-shaped, with no traceback, and passes the checkpoints we ship."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from bagel.checkpoints.check_checkpoint import checkpoint_faults, main, model_dir_fault

ROOT = Path(__file__).resolve().parents[3]
TRAINED = ROOT / "examples" / "tiny_shapes" / "checkpoint"
EMBED = "language_model.model.embed_tokens.weight"
GEN_KEY = "language_model.model.layers.1.mlp_moe_gen.up_proj.weight"
VIT_KEY = "connector.fc1.weight"
AE_KEY = "decoder.conv_out.weight"


@pytest.fixture
def copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, target)
    return target


def edit_tensors(path: Path, change) -> None:
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize("directory", [TRAINED, None], ids=["trained", "tiny"])
def test_the_checkpoints_we_ship_and_write_are_complete(directory, tiny_model_dir, capsys):
    directory = directory or tiny_model_dir
    assert checkpoint_faults(directory) == []
    assert model_dir_fault(directory) is None
    assert main([str(directory)]) == 0
    assert "a complete BAGEL checkpoint (4 layers" in capsys.readouterr().out


def test_every_removed_and_reshaped_key_is_named(copy, capsys):
    def damage(tensors):
        del tensors[GEN_KEY], tensors[VIT_KEY]
        tensors[EMBED] = tensors[EMBED][:-1].clone()

    edit_tensors(copy / "ema.safetensors", damage)
    edit_tensors(copy / "ae.safetensors", lambda t: t.pop("decoder.norm_out.bias"))
    faults = checkpoint_faults(copy)
    rows, hidden = load_file(copy / "ema.safetensors")[EMBED].shape
    assert faults == [
        "ae.safetensors: missing key decoder.norm_out.bias",
        f"ema.safetensors: missing key {VIT_KEY}",
        f"ema.safetensors: missing key {GEN_KEY}",
        f"ema.safetensors: wrong shape of {EMBED}: file [{rows}, {hidden}], expected "
        f"[{rows + 1}, {hidden}]",
    ]
    assert main([str(copy)]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == faults and err == f"{copy}: 4 fault(s)\n"


def test_a_text_only_check_leaves_out_the_generation_expert(copy):
    edit_tensors(copy / "ema.safetensors", lambda t: t.pop(GEN_KEY))
    assert checkpoint_faults(copy, with_gen=False) == []
    assert checkpoint_faults(copy) == [f"ema.safetensors: missing key {GEN_KEY}"]


@pytest.mark.parametrize(
    "name", ["llm_config.json", "vit_config.json", "ema.safetensors", "ae.safetensors"]
)
def test_a_missing_file_is_named(copy, name):
    (copy / name).unlink()
    assert checkpoint_faults(copy)[0] == f"missing file: {copy / name}"


def test_a_missing_tokenizer_is_named(copy):
    for name in ("tokenizer.json", "vocab.json"):
        (copy / name).unlink(missing_ok=True)
    assert checkpoint_faults(copy) == [
        f"missing file: {copy / 'tokenizer.json'} (or vocab.json + merges.txt): no Qwen2 tokenizer"
    ]


def test_broken_files_are_faults_not_tracebacks(copy):
    (copy / "llm_config.json").write_text(json.dumps({"hidden_size": 8}))
    (copy / "ema.safetensors").write_bytes(b"not a safetensors file")
    faults = checkpoint_faults(copy)
    assert faults[0] == "llm_config.json: lacks key 'vocab_size'"
    # Without the LLM config the ema file's expected keys are unknown: it is not read.
    assert len(faults) == 1


def test_an_unreadable_safetensors_header_is_named(copy):
    (copy / "ae.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    [fault] = checkpoint_faults(copy)
    assert fault.startswith("ae.safetensors: ")


def test_a_bad_native_size_is_a_start_up_fault(copy):
    (copy / "model_info.json").write_text(json.dumps({"native_size": 100}))
    fault = model_dir_fault(copy)
    assert fault is not None and "native_size=100 must be a positive multiple of 16" in fault


def test_the_command_prints_one_line_per_fault_and_no_traceback(copy):
    (copy / "ae.safetensors").unlink()
    done = subprocess.run(
        [sys.executable, "-m", "bagel.checkpoints.check_checkpoint", str(copy)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stdout == f"missing file: {copy / 'ae.safetensors'}\n"
    assert "Traceback" not in done.stderr
