"""Peak GPU memory of every rank, for the `bagel_diffusion_peak_memory_bytes{rank,kind}` gauges
and rank 0's log: each rank reads its own allocator's peaks (since the process started), and one
all-gather of two int64 per rank on the control group (gloo, on the CPU) brings them to rank 0.

Every rank gathers at the same two points, after joining the group and at the end of each job,
so the collective always pairs up. On CPU ranks there is nothing to measure and nothing is sent.
Rank 0's own gauges read its allocator live, because it decodes the image after the gather.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from serving.service.metrics import ServiceMetrics

GIB = 1024**3


@dataclass(frozen=True)
class PeakMemory:
    """Bytes: the caching allocator's peak reservation and the peak held by tensors."""

    reserved: int
    allocated: int


def local_peak(device: torch.device) -> PeakMemory | None:
    """This process's peaks on `device`; None on a CPU."""
    if device.type != "cuda":
        return None
    return PeakMemory(
        torch.cuda.max_memory_reserved(device), torch.cuda.max_memory_allocated(device)
    )


def gather_peaks(device: torch.device, group: dist.ProcessGroup | None) -> tuple[PeakMemory, ...]:
    """Every rank's peaks, in rank order, on every rank (call on all ranks of `group` alike);
    () on CPU ranks."""
    mine = local_peak(device)
    if mine is None:
        return ()
    if group is None:
        return (mine,)
    local = torch.tensor([mine.reserved, mine.allocated], dtype=torch.int64)
    everyone = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, local, group=group)
    return tuple(PeakMemory(*(int(v) for v in t.tolist())) for t in everyone)


def publish_peaks(
    metrics: ServiceMetrics, peaks: Sequence[PeakMemory], device: torch.device
) -> None:
    """Set the gauges: ranks 1.. from `peaks`, rank 0 read live from `device` at each scrape."""
    if device.type != "cuda":
        return
    gauge = metrics.peak_memory_bytes
    gauge.labels(rank="0", kind="reserved").set_function(
        lambda: torch.cuda.max_memory_reserved(device)
    )
    gauge.labels(rank="0", kind="allocated").set_function(
        lambda: torch.cuda.max_memory_allocated(device)
    )
    for rank, peak in enumerate(peaks[1:], start=1):
        gauge.labels(rank=str(rank), kind="reserved").set(peak.reserved)
        gauge.labels(rank=str(rank), kind="allocated").set(peak.allocated)


def peaks_note(peaks: Sequence[PeakMemory], device: torch.device) -> str:
    """'; peak GPU memory per rank ...' for a log line (rank 0 read now); '' on a CPU."""
    now = local_peak(device)
    if now is None or not peaks:
        return ""
    ranks = ", ".join(
        f"{rank}: {p.reserved / GIB:.1f}/{p.allocated / GIB:.1f}"
        for rank, p in enumerate([now, *peaks[1:]])
    )
    return f"; peak GPU memory per rank (reserved/allocated GiB): {ranks}"
