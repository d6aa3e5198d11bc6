"""`--linear-precision`: parsed once into the settings, and the rank model loaded with it."""

from __future__ import annotations

from pathlib import Path

import pytest

from bagel.network import fp8
from diffusion_service.settings import parse_settings
from diffusion_service.worker import load_rank_model


def test_linear_precision_defaults_to_bf16_and_parses_fp8():
    assert parse_settings(["--model", "m"]).linear_precision == "bf16"
    assert parse_settings(["--model", "m", "--linear-precision", "fp8"]).linear_precision == "fp8"
    with pytest.raises(SystemExit):
        parse_settings(["--model", "m", "--linear-precision", "int8"])


def test_ranks_load_fp8_linear_layers_when_asked(tiny_model_dir: Path):
    settings = parse_settings(["--model", str(tiny_model_dir), "--linear-precision", "fp8"])
    model, markers = load_rank_model(settings, 0)
    assert isinstance(model.layers[0].self_attn.q_proj_moe_gen, fp8.Fp8Linear)
    assert isinstance(model.layers[0].self_attn.q_proj, fp8.Fp8WeightLinear)
    plain, _ = load_rank_model(parse_settings(["--model", str(tiny_model_dir)]), 0)
    assert not isinstance(plain.layers[0].self_attn.q_proj_moe_gen, fp8.Fp8Linear)
