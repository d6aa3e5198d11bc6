"""16 clients for 60 s against the prefill service in front of a 2-rank diffusion service: every
response is the image of its own request (equal to the in-process reference for its prompt and
seed), none is lost, RESOURCE_EXHAUSTED comes only beyond the configured queue, and the services'
memory does not grow."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest

from bagel.pipeline import Pipeline
from client import BagelClient
from serving.params import GenerationParams
from tests.helpers.processes import pids_with_arg
from tests.helpers.tally import LoadFigures
from tests.reliability.conftest import ServicePair, Tally, pixels

CLIENTS = 16
SECONDS = 60.0
WINDOW_S = 10.0  # RSS: the mean of the first WINDOW_S seconds against that of the last
MAX_QUEUE = 16  # every client's request fits: 1 running + 15 waiting
SEEDS_PER_CLIENT = 4
SIZE = {"height": 32, "width": 32}
LOAD = {**SIZE, "num_timesteps": 4}


def prompt_of(client: int) -> str:
    return f"a lighthouse on island number {client}"


def seed_of(client: int, k: int) -> int:
    """Each client cycles through seeds of its own: no two requests in flight share prompt or
    seed, so a response given to the wrong caller cannot look right."""
    return 1000 * client + k % SEEDS_PER_CLIENT


def references(pipeline: Pipeline) -> dict[tuple[int, int], np.ndarray]:
    """The in-process image of every (client, seed) the load can ask for, computed once."""
    images = {}
    for client in range(CLIENTS):
        contexts = pipeline.prefill(prompt_of(client))
        for k in range(SEEDS_PER_CLIENT):
            params = GenerationParams(seed=seed_of(client, k), **LOAD)
            latents = pipeline.denoise(contexts, params)
            images[client, params.seed] = pixels(pipeline.decode(latents, **SIZE))
    return images


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total += next(
            int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")
        )
    return total / 1024


@dataclasses.dataclass
class Outcomes:
    served: int = 0
    wrong: list[str] = dataclasses.field(default_factory=list)
    errors: Counter = dataclasses.field(default_factory=Counter)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def count(self, error: str | None = None, wrong: str | None = None) -> None:
        with self.lock:
            if wrong is not None:
                self.wrong.append(wrong)
            elif error is not None:
                self.errors[error] += 1
            else:
                self.served += 1


@pytest.mark.slow
def test_16_clients_for_60_s_lose_nothing_mix_nothing_and_memory_stays_flat(
    tiny_model_dir: Path, pipeline: Pipeline, tally: Tally
):
    pair = ServicePair(tiny_model_dir, diffusion_args=["--max-queue", str(MAX_QUEUE)]).start()
    try:
        expected = references(pipeline)  # while the services start
        pair.wait_serving()
        outcomes = Outcomes()
        window: dict[str, float] = {}

        def open_window() -> None:  # runs once, before any waiter is let go
            window["start"] = time.monotonic()
            window["end"] = window["start"] + SECONDS

        warmed = threading.Barrier(CLIENTS + 1, action=open_window)

        def one_request(client: BagelClient, index: int, k: int) -> None:
            seed, request_id = seed_of(index, k), f"load-{index}-{k}"
            try:
                result = client.generate(prompt_of(index), seed=seed, request_id=request_id, **LOAD)
            except grpc.RpcError as e:
                outcomes.count(error=e.code().name)
                return
            image = pixels(result.image)
            if (
                result.seed != seed
                or result.request_id != request_id
                or np.abs(image - expected[index, seed]).max() > 1
            ):
                outcomes.count(wrong=f"{request_id}: got seed {result.seed}")
            else:
                outcomes.count()

        def run_client(index: int) -> None:
            try:
                with BagelClient(pair.prefill.address, timeout=60) as client:
                    one_request(client, index, 0)  # warm-up: counted and checked like the rest
                    warmed.wait(120)
                    k = 1
                    while time.monotonic() < window["end"]:
                        one_request(client, index, k)
                        k += 1
            except Exception as e:  # noqa: BLE001 - a client that stops is a lost response
                outcomes.count(error=f"client {index}: {e!r}")

        threads = [threading.Thread(target=run_client, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        warmed.wait(120)
        start = window["start"]
        groups = {
            "diffusion (3 processes)": pids_with_arg(f"--listen {pair.diffusion_address}"),
            "prefill": [pair.prefill.proc.pid],
        }
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in groups}
        while (now := time.monotonic()) < window["end"]:
            for name, pids in groups.items():
                samples[name].append((now - start, rss_mb(pids)))
            time.sleep(1.0)
        for t in threads:
            t.join(120)
        assert len(groups["diffusion (3 processes)"]) == 3

        def mean(values: list[float]) -> float:
            return sum(values) / len(values)

        rss = {
            name: (
                mean([mb for t, mb in points if t < WINDOW_S]),
                mean([mb for t, mb in points if t >= SECONDS - WINDOW_S]),
            )
            for name, points in samples.items()
        }
        exhausted = outcomes.errors["RESOURCE_EXHAUSTED"]
        lost = sum(outcomes.errors.values()) - exhausted + len(outcomes.wrong)
        tally.load = LoadFigures(CLIENTS, SECONDS, outcomes.served, lost, exhausted, MAX_QUEUE, rss)
        assert outcomes.wrong == []
        assert dict(outcomes.errors) == {} or set(outcomes.errors) == {"RESOURCE_EXHAUSTED"}, (
            outcomes.errors
        )
        assert exhausted == 0  # 16 clients never fill a queue of 16 behind the running job
        assert outcomes.served >= CLIENTS * 5
        for name, (first, last) in rss.items():
            assert last <= first * 1.10, f"{name}: RSS {first:.0f} MB -> {last:.0f} MB"
        assert pair.diffusion.proc.poll() is None and pair.prefill.proc.poll() is None
    finally:
        pair.close()
