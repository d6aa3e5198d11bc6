"""The end-to-end benchmark's bookkeeping, without services: runs named from their flags, the
metrics page read into load times and peak memory, requests summarised, the table laid out."""

from __future__ import annotations

import pytest
import torch

from benchmarks.e2e_service import (
    GIB,
    Run,
    layout_name,
    parse_metrics,
    service_figures,
    summarise,
    table,
)

METRICS = f"""# HELP bagel_diffusion_model_load_seconds Seconds from the start of loading to serving
# TYPE bagel_diffusion_model_load_seconds gauge
bagel_diffusion_model_load_seconds 21.5
# HELP bagel_diffusion_peak_memory_bytes Peak GPU memory of a rank since it started
# TYPE bagel_diffusion_peak_memory_bytes gauge
bagel_diffusion_peak_memory_bytes{{kind="reserved",rank="1"}} {28 * GIB}
bagel_diffusion_peak_memory_bytes{{kind="allocated",rank="1"}} {25 * GIB}
bagel_diffusion_peak_memory_bytes{{kind="reserved",rank="0"}} {30 * GIB}
bagel_diffusion_peak_memory_bytes{{kind="allocated",rank="0"}} {27 * GIB}
"""


@pytest.mark.parametrize(
    ("topology", "precision", "layout", "slug"),
    [
        ("", None, "1 GPU", "single-default"),
        ("--ulysses 2", "bf16", "Ulysses 2", "ulysses2-bf16"),
        ("--kv-gather 2 --ring 2", "fp8", "KV gather 2 x Ring 2", "kvgather2ring2-fp8"),
        ("--cfg-parallel 2", None, "CFG 2", "cfgparallel2-default"),
    ],
)
def test_runs_are_named_from_their_flags(topology, precision, layout, slug):
    run = Run(topology, precision)
    assert layout_name(run.parallel("cuda"), "cuda") == layout
    assert run.slug == slug
    precision_flags = ["--linear-precision", precision] if precision else []
    assert run.diffusion_flags() == topology.split() + precision_flags


def test_a_preset_run_is_named_from_what_it_resolves_to(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    run = Run("--preset fast", None)
    assert layout_name(run.parallel("cuda"), "cuda") == "KV gather 2"
    assert run.precision_name("cuda") == "fp8"
    assert run.slug == "presetfast-default"
    bf16 = Run("--preset fast", "bf16")
    assert (bf16.precision_name("cuda"), bf16.parallel("cuda").kv_gather) == ("bf16", 2)


def test_one_rank_off_cuda_is_not_called_a_gpu():
    assert layout_name(Run("", None).parallel("cpu"), "cpu") == "1 rank"
    assert Run("", None).precision_name("cpu") == "fp32"
    assert Run("", None).precision_name("cuda") == "bf16"


def test_metrics_give_load_time_and_peak_memory_per_rank_in_rank_order():
    figures = service_figures(parse_metrics(METRICS), "diffusion")
    assert figures["load_s"] == 21.5
    assert figures["peak_gib"] == [
        {"rank": 0, "reserved": 30.0, "allocated": 27.0},
        {"rank": 1, "reserved": 28.0, "allocated": 25.0},
    ]


def test_a_service_still_loading_or_on_cpu_has_no_figures():
    text = "# TYPE bagel_prefill_model_load_seconds gauge\nbagel_prefill_model_load_seconds 0.0\n"
    assert service_figures(parse_metrics(text), "prefill") == {"load_s": None, "peak_gib": []}


def test_the_first_request_is_apart_and_the_others_averaged():
    requests = [
        {"denoise_ms": 30_000.0, "client_ms": 40_000.0},
        {"denoise_ms": 9_000.0, "client_ms": 9_400.0},
        {"denoise_ms": 9_200.0, "client_ms": 9_600.0},
    ]
    summary = summarise(requests)
    assert summary["first"] == requests[0]
    assert summary["warm"] == {"denoise_ms": 9_100.0, "client_ms": 9_500.0}
    assert summary["warm_requests"] == 2
    assert summarise(requests[:1])["warm"] is None


def test_table_has_a_first_and_a_warm_line_per_run_and_one_for_a_failure():
    ok = {
        "layout": "Ulysses 2",
        "precision": "bf16",
        "load_s": {"prefill": 12.0, "diffusion": 21.5},
        "peak_gib": {
            "diffusion": [{"rank": 0, "reserved": 30.0, "allocated": 27.0}],
            "prefill": [],
        },
        "summary": summarise([{"client_ms": 40_000.0}, {"client_ms": 5_500.0}]),
    }
    failed = {"layout": "Ring 2", "precision": "fp8", "error": "exited\nTraceback ..."}
    lines = table([ok, failed]).splitlines()
    assert len(lines) == 4
    assert "12.0/21.5" in lines[1] and "0:30.0/27.0" in lines[1] and "n/a" in lines[1]
    assert lines[1].rstrip().endswith("40000.0") and lines[2].rstrip().endswith("5500.0")
    assert lines[2].index("warm x1") == lines[1].index("first")
    assert lines[3].endswith("failed: exited")
