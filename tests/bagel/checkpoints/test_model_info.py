"""A checkpoint's facts: its name and native size from `model_info.json`, else its folder's name
and the model's largest size; a file that breaks them is a CheckpointError naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bagel.checkpoints.model_info import (
    MODEL_INFO_FILE,
    CheckpointFacts,
    read_checkpoint_facts,
    write_checkpoint_facts,
)
from bagel.network.config import BAGEL_7B, CheckpointError

TRAINED = Path(__file__).resolve().parents[3] / "examples" / "tiny_shapes" / "checkpoint"


def test_the_trained_checkpoint_says_it_was_trained_at_128():
    assert read_checkpoint_facts(TRAINED, BAGEL_7B) == CheckpointFacts("tiny-shapes", 128)


def test_without_the_file_the_folder_names_it_at_its_largest_size(tmp_path: Path):
    folder = tmp_path / "BAGEL-7B-MoT"
    folder.mkdir()
    assert read_checkpoint_facts(folder, BAGEL_7B) == CheckpointFacts("BAGEL-7B-MoT", 1024)


def test_written_facts_read_back(tmp_path: Path):
    write_checkpoint_facts(tmp_path, CheckpointFacts("mine", 256))
    assert read_checkpoint_facts(tmp_path, BAGEL_7B) == CheckpointFacts("mine", 256)
    assert json.loads((tmp_path / MODEL_INFO_FILE).read_text()) == {
        "model_name": "mine",
        "native_size": 256,
    }


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{"native_size": 100}',
            "native_size=100 must be a positive multiple of 16 and at most 1024",
        ),
        ('{"native_size": 2048}', "native_size=2048 must be a positive multiple of 16"),
        ('{"native_size": 0}', "native_size=0 must be a positive multiple of 16"),
        ("not json", "not a model_info object"),
        ("[1, 2]", "not a model_info object"),
    ],
)
def test_a_bad_file_is_named(tmp_path: Path, content: str, message: str):
    (tmp_path / MODEL_INFO_FILE).write_text(content)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint_facts(tmp_path, BAGEL_7B)
    assert str(info.value).startswith(f"{tmp_path / MODEL_INFO_FILE}: ")
    assert message in str(info.value)


def test_the_tiny_writer_writes_its_facts(tiny_model_dir: Path):
    assert read_checkpoint_facts(tiny_model_dir, BAGEL_7B) == CheckpointFacts(
        "bagel-tiny-random", 64
    )
