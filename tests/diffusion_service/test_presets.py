"""`--preset`: what each preset sets when the flags are read, for the ranks present (1 and 2
GPUs, torchrun's world), a flag the command line gives winning over it, and `--help` saying
what each trades."""

from __future__ import annotations

import pytest
import torch

from diffusion_service import presets
from diffusion_service.parallel.config import ParallelConfig
from diffusion_service.settings import ServiceSettings, parse_settings
from serving import flags

TORCHRUN = ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "MASTER_ADDR")


@pytest.fixture(autouse=True)
def own_ranks(monkeypatch):
    """Not under torchrun unless a test says so."""
    for name in TORCHRUN:
        monkeypatch.delenv(name, raising=False)


def gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def parse(*argv: str) -> ServiceSettings:
    return parse_settings(["--model", "m", *argv])


def test_exact_is_the_default_and_sets_what_no_preset_does(monkeypatch):
    gpus(monkeypatch, 2)
    for device in ("cpu", "cuda"):
        default = parse("--device", device)
        assert default.preset == "exact"
        assert parse("--device", device, "--preset", "exact") == default
        assert default == ServiceSettings(model_dir="m", device=device)
        assert default.linear_precision == "bf16" and default.parallel == ParallelConfig()


@pytest.mark.parametrize(
    ("count", "layout"),
    [
        (1, ParallelConfig()),
        (2, ParallelConfig(kv_gather=2)),
        (3, ParallelConfig(kv_gather=2)),  # the largest measured count that fits
        (4, ParallelConfig(ulysses=2, ring=2)),
        (8, ParallelConfig(ulysses=2, ring=2)),
    ],
)
def test_fast_takes_fp8_and_the_fastest_measured_layout_for_the_gpus_present(
    monkeypatch, count, layout
):
    gpus(monkeypatch, count)
    settings = parse("--device", "cuda", "--preset", "fast")
    assert settings.linear_precision == "fp8"
    assert settings.parallel == layout
    assert settings.world_size == layout.world_size
    assert settings.default_cache == ServiceSettings(model_dir="m").default_cache  # none


def test_fast_on_the_cpu_runs_one_rank_with_fp8_linears(monkeypatch):
    gpus(monkeypatch, 2)  # GPUs present do not matter to a CPU service
    settings = parse("--preset", "fast")
    assert (settings.linear_precision, settings.parallel) == ("fp8", ParallelConfig())


@pytest.mark.parametrize(
    ("world", "layout"), [("1", ParallelConfig()), ("2", ParallelConfig(kv_gather=2))]
)
def test_fast_under_torchrun_fills_its_world(monkeypatch, world, layout):
    gpus(monkeypatch, 8)  # torchrun's world, not the GPUs visible, sizes the layout
    for name, value in {"RANK": "0", "WORLD_SIZE": world, "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    settings = parse("--device", "cuda", "--preset", "fast")
    assert settings.torchrun
    assert (settings.linear_precision, settings.parallel) == ("fp8", layout)


def test_fast_under_a_torchrun_world_no_layout_was_measured_for_exits_2(monkeypatch, capsys):
    for name, value in {"RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exited:
        parse("--device", "cuda", "--preset", "fast")
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--preset fast: no layout is measured for the 3 ranks torchrun started" in err
    # a layout given by flags needs no measured one
    assert parse("--device", "cuda", "--preset", "fast", "--ring", "3").parallel.ring == 3


@pytest.mark.parametrize(
    ("argv", "precision", "layout"),
    [
        (["--linear-precision", "bf16"], "bf16", ParallelConfig(kv_gather=2)),
        (["--ring", "2"], "fp8", ParallelConfig(ring=2)),
        (["--kv-gather", "1"], "fp8", ParallelConfig()),  # given at its default: still given
        (["--sp-attention", "ring"], "fp8", ParallelConfig(sp_attention="ring")),
        (["--ulysses", "2", "--linear-precision", "bf16"], "bf16", ParallelConfig(ulysses=2)),
    ],
)
def test_a_flag_given_wins_over_the_preset(monkeypatch, argv, precision, layout):
    gpus(monkeypatch, 2)
    settings = parse("--device", "cuda", "--preset", "fast", *argv)
    assert (settings.linear_precision, settings.parallel) == (precision, layout)
    # and the flag's order against --preset does not matter
    assert parse(*argv, "--device", "cuda", "--preset", "fast") == settings


def test_an_unknown_preset_exits_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as exited:
        parse("--preset", "turbo")
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "argument --preset: invalid choice: 'turbo' (choose from 'exact', 'fast')" in err


def test_help_says_each_preset_trades_quality_for_speed():
    text = " ".join(
        flags.build_parser(ServiceSettings, "python -m diffusion_service").format_help().split()
    )
    assert "--preset {exact,fast} a quality/speed trade-off" in text
    for name, preset in presets.PRESETS.items():
        assert f"{name}: {' '.join(preset.summary.split())}" in text
    assert "(default: exact)" in text


def test_every_preset_names_a_valid_layout_and_precision():
    for ranks, layout in presets.FASTEST_LAYOUTS.items():
        assert layout.world_size == ranks
        layout.validate(num_heads=28, num_kv_heads=4)  # BAGEL-7B-MoT's heads
    for preset in presets.PRESETS.values():
        assert preset.linear_precision in (None, "bf16", "fp8")
