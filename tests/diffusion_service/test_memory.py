"""Every rank's peak GPU memory reaches rank 0 in one gather over the control group, and becomes
the `bagel_diffusion_peak_memory_bytes{rank,kind}` gauges; CPU ranks send and publish nothing."""

from __future__ import annotations

import torch
import torch.distributed as dist

from diffusion_service import memory
from diffusion_service.memory import PeakMemory, gather_peaks, peaks_note, publish_peaks
from serving.service.metrics import ServiceMetrics
from tests.helpers.ranks import run_ranks

GPU = torch.device("cuda", 0)  # never touched: the allocator reads are replaced below


def _gather_with_fake_gpus(rank: int, world: int) -> dict[str, torch.Tensor]:
    memory.local_peak = lambda device: PeakMemory(1000 + rank, 10 + rank)
    peaks = gather_peaks(GPU, dist.group.WORLD)
    return {"peaks": torch.tensor([[p.reserved, p.allocated] for p in peaks])}


def test_every_rank_gets_every_ranks_peaks_in_rank_order():
    results = run_ranks(3, _gather_with_fake_gpus)
    for result in results:
        assert result["peaks"].tolist() == [[1000, 10], [1001, 11], [1002, 12]]


def test_cpu_ranks_gather_nothing():
    assert gather_peaks(torch.device("cpu"), None) == ()
    assert peaks_note((), torch.device("cpu")) == ""


def test_gauges_hold_the_other_ranks_peaks_and_read_rank_0_live(monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 30 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 27 * 2**30)
    metrics = ServiceMetrics("diffusion")
    peaks = (PeakMemory(1, 1), PeakMemory(28 * 2**30, 25 * 2**30))
    publish_peaks(metrics, peaks, GPU)
    value = metrics.registry.get_sample_value
    name = "bagel_diffusion_peak_memory_bytes"
    assert value(name, {"rank": "0", "kind": "reserved"}) == 30 * 2**30  # read now, not peaks[0]
    assert value(name, {"rank": "0", "kind": "allocated"}) == 27 * 2**30
    assert value(name, {"rank": "1", "kind": "reserved"}) == 28 * 2**30
    assert value(name, {"rank": "1", "kind": "allocated"}) == 25 * 2**30
    assert peaks_note(peaks, GPU) == (
        "; peak GPU memory per rank (reserved/allocated GiB): 0: 30.0/27.0, 1: 28.0/25.0"
    )


def test_cpu_service_publishes_no_memory_gauge():
    metrics = ServiceMetrics("diffusion")
    publish_peaks(metrics, (), torch.device("cpu"))
    text = "\n".join(s.name for family in metrics.registry.collect() for s in family.samples)
    assert "peak_memory" not in text
