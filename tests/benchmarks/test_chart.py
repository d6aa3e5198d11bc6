"""The standing chart: bars from the hand-maintained figures and from e2e_service JSON (built
without matplotlib), and a PNG drawn from them when matplotlib is installed (the `plot` extra)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from benchmarks import chart

STANDING = {
    "title": "t",
    "rows": [
        {"layout": "1 GPU", "gpus": 1, "series": "ours, in-process bf16 (sp_gpu)",
         "seconds": 9.24, "range": [9.09, 9.24], "source": "docs/benchmarks.md"},
        {"layout": "Ulysses 2", "gpus": 2, "series": "ours, both services, bf16",
         "seconds": 6.0, "source": "an older e2e run"},
        {"layout": "1 GPU", "gpus": 1, "series": "vLLM-Omni (published)", "seconds": 19.04,
         "label": "baseline", "source": "vllm-project/vllm-omni pull request #1903"},
    ],
    "floors": [{"label": "bf16 floor, 1 GPU", "seconds": 7.5, "layouts": ["1 GPU"]}],
}  # fmt: skip


def e2e_result(rows: list[dict]) -> dict:
    return {"settings": {"size": 1024, "steps": 50}, "card": "2 x NVIDIA H200", "rows": rows}


def e2e_row(layout: str, precision: str, warm_ms: float | None, world: int = 2) -> dict:
    first = {"client_ms": 30_000.0, "denoise_ms": 25_000.0}
    warm = None if warm_ms is None else {"client_ms": warm_ms, "denoise_ms": warm_ms - 300}
    summary = {"first": first, "warm": warm, "warm_requests": 0 if warm is None else 2}
    return {"layout": layout, "precision": precision, "world": world, "summary": summary}


def test_standing_rows_become_bars_with_their_range_and_label():
    bars = chart.standing_bars(STANDING)
    assert bars[0] == chart.Bar("1 GPU", "ours, in-process bf16 (sp_gpu)", 9.24, 1, 9.09, 9.24)
    assert bars[2].label == "baseline" and bars[2].low is None
    assert chart.standing_floors(STANDING) == [chart.Floor("bf16 floor, 1 GPU", 7.5, ("1 GPU",))]


def test_e2e_runs_give_warm_seconds_per_precision_and_skip_failures():
    result = e2e_result(
        [
            e2e_row("Ulysses 2", "bf16", 5_400.0),
            e2e_row("Ulysses 2", "fp8", None),  # one request only: its time is the first's
            {"layout": "Ring 2", "precision": "fp8", "world": 2, "error": "exited"},
        ]
    )
    bars = chart.e2e_bars(result)
    assert [(b.layout, b.series, b.seconds, b.gpus) for b in bars] == [
        ("Ulysses 2", "ours, both services, bf16", 5.4, 2),
        ("Ulysses 2", "ours, both services, fp8", 30.0, 2),
    ]


def test_e2e_bars_replace_standing_bars_of_the_same_series_and_layout():
    merged = chart.merge(
        chart.standing_bars(STANDING),
        chart.e2e_bars(e2e_result([e2e_row("Ulysses 2", "bf16", 5_400.0)])),
    )
    services = [b for b in merged if b.series == "ours, both services, bf16"]
    assert [(b.layout, b.seconds) for b in services] == [("Ulysses 2", 5.4)]
    assert len(merged) == 3
    assert chart.first_seen(b.layout for b in merged) == ["1 GPU", "Ulysses 2"]


def test_our_series_come_first_and_the_peers_last():
    bars = [
        chart.Bar("1 GPU", "vLLM-Omni (published)", 19.0),
        chart.Bar("1 GPU", "ours, both services, fp8", 6.0),
        chart.Bar("1 GPU", "ours, a new kind", 5.0),
        chart.Bar("1 GPU", "ours, in-process bf16 (sp_gpu)", 9.2),
    ]
    assert chart.series_order(bars) == [
        "ours, in-process bf16 (sp_gpu)",
        "ours, both services, fp8",
        "ours, a new kind",
        "vLLM-Omni (published)",
    ]


def test_every_series_gets_a_distinct_colour():
    series = ["ours, both services, fp8", "vLLM-Omni (published)", "someone else", "another"]
    colours = chart.colour_of(series)
    assert len(set(colours.values())) == len(series)


def test_checked_in_standing_figures_name_their_sources():
    standing = json.loads(chart.STANDING.read_text())
    bars = chart.standing_bars(standing)
    assert bars and all(row["source"] for row in standing["rows"])
    layouts = {b.layout for b in bars}
    for floor in chart.standing_floors(standing):
        assert set(floor.layouts) <= layouts


@pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None,
    reason='matplotlib is the plot extra: pip install -e ".[plot]"',
)
def test_chart_is_drawn_from_standing_and_e2e_json(tmp_path: Path):
    standing = tmp_path / "standing.json"
    standing.write_text(json.dumps(STANDING))
    e2e = tmp_path / "e2e.json"
    e2e.write_text(json.dumps(e2e_result([e2e_row("1 GPU", "fp8", 6_100.0, world=1)])))
    output = tmp_path / "standing.png"
    chart.main(["--standing", str(standing), "--e2e", str(e2e), "-o", str(output)])
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
