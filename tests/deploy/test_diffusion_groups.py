"""One prefill service in front of two diffusion services (`--diffusion A,B`), all real processes
on 127.0.0.1: requests are spread over both; once one is killed (SIGKILL to its process group)
every request succeeds on the other within one health-poll interval; with both gone the prefill
service says NOT_SERVING and a request ends UNAVAILABLE naming both."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import grpc
import pytest

from client import BagelClient
from prefill_service.relay import HEALTH_CHECK_TIMEOUT_S, HEALTH_POLL_S
from tests.helpers.metrics import metrics_when
from tests.helpers.processes import ServiceProcess, health_status
from tests.helpers.ranks import free_port

SMALL = {"height": 32, "width": 32, "num_timesteps": 4}
REQUEST_TIMEOUT_S = 20.0
# A group that dies leaves the rotation at the next health check: one poll interval plus the
# check's own timeout, at most.
OUT_OF_ROTATION_S = HEALTH_POLL_S + HEALTH_CHECK_TIMEOUT_S


def count(text: str, metric: str, labels: str) -> float:
    """The value of `metric{labels}` on a Prometheus page (0 when absent)."""
    match = re.search(rf"^{re.escape(metric)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


class Diffusion:
    """A one-rank diffusion service in a process group of its own, with its metrics port."""

    def __init__(self, model_dir: Path) -> None:
        self.metrics_port = free_port()
        args = ["--model", str(model_dir), "--metrics-port", str(self.metrics_port)]
        self.process = ServiceProcess("diffusion_service", args, new_session=True)
        self.address = self.process.address

    def ok_requests(self) -> float:
        text = metrics_when(self.metrics_port, "bagel_diffusion_requests_total", timeout=2.0)
        return count(text, "bagel_diffusion_requests_total", 'code="OK"')

    def kill_group(self) -> None:
        os.killpg(self.process.proc.pid, signal.SIGKILL)
        self.process.proc.wait(10)


@pytest.fixture
def deployment(tiny_model_dir: Path):
    diffusions = [Diffusion(tiny_model_dir), Diffusion(tiny_model_dir)]
    metrics_port = free_port()
    prefill = ServiceProcess(
        "prefill_service.mock",
        [
            "--model",
            str(tiny_model_dir),
            "--diffusion",
            ",".join(d.address for d in diffusions),
            "--metrics-port",
            str(metrics_port),
        ],
    )
    try:
        for service in (*(d.process for d in diffusions), prefill):
            service.wait_serving(90)
        # The prefill service asks each group's health once a second: wait until it has seen both.
        for d in diffusions:
            needle = f'bagel_prefill_diffusion_serving{{diffusion="{d.address}"}} 1.0'
            assert needle in metrics_when(metrics_port, needle, timeout=10), prefill.log()
        yield prefill, diffusions, metrics_port
    finally:
        for service in (prefill, *(d.process for d in diffusions)):
            service.__exit__()


def generate(client: BagelClient, seed: int) -> grpc.StatusCode:
    try:
        result = client.generate("a red circle", seed=seed, timeout=REQUEST_TIMEOUT_S, **SMALL)
    except grpc.RpcError as e:
        return e.code()
    assert result.image is not None and result.image.size == (32, 32)
    return grpc.StatusCode.OK


@pytest.mark.slow  # two diffusion groups and a prefill service started, one group killed: ~14 s
def test_requests_spread_over_two_groups_and_survive_one_being_killed(deployment):
    prefill, (a, b), metrics_port = deployment
    with BagelClient(prefill.address) as client:
        assert [generate(client, seed) for seed in range(4)] == [grpc.StatusCode.OK] * 4
        routed = metrics_when(metrics_port, "bagel_prefill_routed_requests_total")
        for d in (a, b):  # idle groups take turns: two each, seen on both sides
            assert (
                count(routed, "bagel_prefill_routed_requests_total", f'diffusion="{d.address}"')
                == 2.0
            )
            assert d.ok_requests() == 2.0

        a.kill_group()
        killed = time.monotonic()
        outcomes: list[tuple[float, grpc.StatusCode]] = []
        while time.monotonic() - killed < OUT_OF_ROTATION_S + 5.0:  # bounded: ~6.5 s at most
            started = time.monotonic() - killed
            outcomes.append((started, generate(client, 10 + len(outcomes))))
            late = [code for t, code in outcomes if t >= OUT_OF_ROTATION_S]
            if len(late) >= 3:
                break
        late = [code for t, code in outcomes if t >= OUT_OF_ROTATION_S]
        assert len(late) >= 3 and set(late) == {grpc.StatusCode.OK}, outcomes
        early = {code for t, code in outcomes if t < OUT_OF_ROTATION_S}
        assert early <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, outcomes
        successes = sum(code is grpc.StatusCode.OK for _, code in outcomes)
        assert b.ok_requests() == 2.0 + successes  # every success after the kill was b's
        assert health_status(prefill.address) == "SERVING"
        assert f"diffusion service at {a.address} is NOT_SERVING" in prefill.log()

        b.kill_group()
        deadline = time.monotonic() + OUT_OF_ROTATION_S + 3.0
        while health_status(prefill.address) != "NOT_SERVING" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert health_status(prefill.address) == "NOT_SERVING"
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            client.generate("a red circle", seed=99, timeout=1.0, **SMALL)
        assert time.monotonic() - started < 2.0
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert err.value.details().startswith("no diffusion service is serving"), (
            err.value.details()
        )
        assert a.address in err.value.details() and b.address in err.value.details()
