"""The routing policy over several diffusion groups (`prefill_service.routing`), with stand-in
links, plus `DiffusionLink.probe` against a real server and a port nobody listens on."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from prefill_service.metrics import PrefillMetrics
from prefill_service.relay import DiffusionLink
from prefill_service.routing import (
    MIN_PROBE_S,
    PROBE_TIMEOUT_S,
    DiffusionGroup,
    DiffusionRouter,
    GroupLease,
    rotation,
    split_addresses,
)
from prefill_service.settings import parse_settings
from serving.errors import ServiceError
from tests.helpers.ranks import free_port


class FakeLink:
    """What the router uses of a DiffusionLink. `connects=False`: the service went away since
    the last health check (probe fails and records it); `back_after`: the health check that
    finds it SERVING again."""

    def __init__(self, address: str, serving: bool | None = True, *, connects: bool = True) -> None:
        self.address = address
        self.serving = serving
        self.connects = connects
        self.connect_timeout_s = 5.0
        self.back_after: int | None = None
        self.probes = 0
        self.checks = 0
        self.check_timeouts: list[float] = []
        self.on_change = None
        self.closed = False

    async def probe(self, timeout: float) -> bool:
        self.probes += 1
        if self.serving and not self.connects:
            self.serving = False
        return bool(self.serving)

    async def check_health(self, timeout: float = 0.5) -> bool:
        self.checks += 1
        self.check_timeouts.append(timeout)
        if self.back_after is not None and self.checks >= self.back_after:
            self.serving, self.connects = True, True
        return bool(self.serving)

    def watch(self, on_change) -> None:
        self.on_change = on_change

    def close(self) -> None:
        self.closed = True


def groups(*links: FakeLink) -> list[DiffusionGroup]:
    return [DiffusionGroup(link) for link in links]


def lease_addresses(router: DiffusionRouter, count: int, deadline: float = 2.0) -> list[str]:
    """Addresses of `count` requests made one after another (each done before the next)."""

    async def run() -> list[str]:
        out = []
        for _ in range(count):
            with await router.lease(deadline) as lease:
                out.append(lease.link.address)
        return out

    return asyncio.run(run())


def test_rotation_puts_the_least_loaded_serving_group_first_and_takes_turns_among_equals():
    a, b, c = groups(FakeLink("A"), FakeLink("B"), FakeLink("C"))
    assert [g.address for g in rotation([a, b, c], turn=0)] == ["A", "B", "C"]
    assert [g.address for g in rotation([a, b, c], turn=2)] == ["C", "A", "B"]
    a.in_flight, b.in_flight, c.in_flight = 2, 0, 1
    assert [g.address for g in rotation([a, b, c], turn=1)] == ["B", "C", "A"]
    assert [g.address for g in rotation([a, b, c], turn=2)] == ["B", "C", "A"]


def test_rotation_leaves_out_groups_that_are_not_serving_or_not_checked_yet():
    a, b, c = groups(FakeLink("A", False), FakeLink("B", None), FakeLink("C"))
    assert [g.address for g in rotation([a, b, c], turn=0)] == ["C"]
    c.link.serving = False
    assert rotation([a, b, c], turn=0) == []


def test_idle_groups_take_turns_and_every_group_gets_requests():
    router = DiffusionRouter([FakeLink("A"), FakeLink("B"), FakeLink("C")])
    assert lease_addresses(router, 6) == ["A", "B", "C", "A", "B", "C"]
    assert [g.in_flight for g in router.groups] == [0, 0, 0]


def test_the_next_request_goes_to_the_group_with_the_fewest_in_flight():
    router = DiffusionRouter([FakeLink("A"), FakeLink("B")])

    async def run() -> list[str]:
        held = [await router.lease(2.0) for _ in range(3)]  # A, B, A: A now has 2 in flight
        nxt = await router.lease(2.0)
        held.append(nxt)
        for lease in held[:2]:  # A and B finish one each: A 1, B 1 in flight
            lease.__exit__(None, None, None)
        last = await router.lease(2.0)
        return [lease.link.address for lease in held] + [last.link.address]

    assert asyncio.run(run()) == ["A", "B", "A", "B", "A"]


def test_a_group_that_fails_to_connect_is_skipped_and_stays_out_until_it_serves_again():
    a, b = FakeLink("A", connects=False), FakeLink("B")
    router = DiffusionRouter([a, b])
    assert lease_addresses(router, 3) == ["B", "B", "B"]
    assert a.serving is False and a.probes == 1  # out of the rotation after one failed connect
    a.serving, a.connects = True, True  # its health check says SERVING again
    assert sorted(lease_addresses(router, 2)) == ["A", "B"]


def test_with_no_group_serving_a_request_waits_for_one_within_its_deadline():
    a, b = FakeLink("A", False), FakeLink("B", False)
    b.back_after = 3
    router = DiffusionRouter([a, b])
    started = time.monotonic()
    assert lease_addresses(router, 1, deadline=5.0) == ["B"]
    assert time.monotonic() - started < 2.0
    assert b.checks == 3


def test_with_no_group_serving_the_request_ends_unavailable_naming_every_group():
    router = DiffusionRouter([FakeLink("A", False), FakeLink("B", connects=False)])
    started = time.monotonic()
    with pytest.raises(ServiceError) as err:
        lease_addresses(router, 1, deadline=0.6)
    assert time.monotonic() - started < 1.0  # the deadline less its margin: 0.4 s
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert err.value.message == (
        "no diffusion service is serving (loading, restarting or unreachable): "
        "A (not serving, 0 in flight), B (not serving, 0 in flight)"
    )
    assert [g.in_flight for g in router.groups] == [0, 0]


def test_one_group_takes_every_request_and_is_left_to_wait_as_with_one_address():
    only = FakeLink("A", False)
    router = DiffusionRouter([only])
    assert lease_addresses(router, 2) == ["A", "A"]
    assert only.probes == 0 and only.checks == 0  # relay's connect waits for it, as before


def test_a_failed_request_leaves_the_in_flight_count_as_it_was():
    router = DiffusionRouter([FakeLink("A"), FakeLink("B")])

    async def run() -> None:
        with await router.lease(2.0):
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "a diffusion rank failed")

    with pytest.raises(ServiceError):
        asyncio.run(run())
    assert [g.in_flight for g in router.groups] == [0, 0]


def test_the_router_serves_while_any_group_does_and_counts_routed_requests():
    a, b = FakeLink("A", False), FakeLink("B", None)
    metrics = PrefillMetrics()
    router = DiffusionRouter([a, b], metrics)
    seen = []

    async def on_change(serving: bool) -> None:
        seen.append(serving)

    router.watch(on_change)
    assert not router.serving
    b.serving = True
    asyncio.run(b.on_change(True))
    assert router.serving and seen == [True]
    lease_addresses(router, 2)

    def sample(name: str, address: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"diffusion": address})

    assert sample("bagel_prefill_routed_requests_total", "B") == 2.0
    assert sample("bagel_prefill_routed_requests_total", "A") == 0.0
    assert sample("bagel_prefill_diffusion_serving", "B") == 1.0
    assert sample("bagel_prefill_diffusion_serving", "A") == 0.0
    router.close()
    assert a.closed and b.closed


def test_diffusion_addresses_are_split_and_checked(capsys):
    assert split_addresses("127.0.0.1:1") == ("127.0.0.1:1",)
    assert split_addresses("a:1, b:2,c:3") == ("a:1", "b:2", "c:3")
    with pytest.raises(ValueError, match="an address is empty"):
        split_addresses("a:1,,b:2")
    with pytest.raises(ValueError, match="a:1 given more than once"):
        split_addresses("a:1,b:2,a:1")
    settings = parse_settings(["--model", "m", "--diffusion", "a:1,b:2"])
    assert settings.diffusion_addresses == ("a:1", "b:2")
    with pytest.raises(SystemExit) as exited:
        parse_settings(["--model", "m", "--diffusion", "a:1,a:1"])
    assert exited.value.code == 2
    assert "given more than once" in capsys.readouterr().err


def test_probe_fails_fast_on_a_refused_connection_and_succeeds_on_a_live_service(
    loop_thread, fake_diffusion
):
    async def probe(address: str) -> tuple[bool, bool | None, float]:
        link = DiffusionLink(address)
        try:
            await link.check_health()
            link.serving = True  # as if its last check had said SERVING
            started = time.monotonic()
            ok = await link.probe(2.0)
            return ok, link.serving, time.monotonic() - started
        finally:
            link.close()

    ok, serving, took = loop_thread.run(probe(f"127.0.0.1:{free_port()}"))
    assert (ok, serving) == (False, False) and took < 1.0
    ok, serving, took = loop_thread.run(probe(fake_diffusion.address))
    assert (ok, serving) == (True, True) and took < 1.0


class RecordingLink(FakeLink):
    """A FakeLink that records each probe's timeout and the in-flight counts seen meanwhile."""

    def __init__(self, address: str, serving: bool | None = True, **kwargs) -> None:
        super().__init__(address, serving, **kwargs)
        self.timeouts: list[float] = []
        self.router: DiffusionRouter | None = None
        self.in_flight_seen: list[list[int]] = []

    async def probe(self, timeout: float) -> bool:
        self.timeouts.append(timeout)
        if self.router is not None:
            self.in_flight_seen.append([g.in_flight for g in self.router.groups])
        return await super().probe(timeout)


def test_a_router_needs_at_least_one_link():
    with pytest.raises(ValueError, match="^at least one diffusion service address is needed$"):
        DiffusionRouter([])


def test_describe_names_each_group_its_health_and_its_requests_in_flight():
    router = DiffusionRouter([FakeLink("A"), FakeLink("B", False), FakeLink("C", None)])
    router.groups[1].in_flight = 2
    assert router.describe() == (
        "A (serving, 0 in flight), B (not serving, 2 in flight), C (not serving, 0 in flight)"
    )
    assert router.addresses == ["A", "B", "C"]


def test_a_probed_group_counts_the_probe_in_flight_and_a_lease_adds_one_to_its_count():
    a, b = RecordingLink("A"), RecordingLink("B")
    router = DiffusionRouter([a, b])
    a.router = b.router = router

    async def run() -> list[GroupLease]:
        return [await router.lease(2.0) for _ in range(3)]  # A, B, then A again

    held = asyncio.run(run())
    assert [lease.link.address for lease in held] == ["A", "B", "A"]
    assert a.in_flight_seen == [[1, 0], [2, 1]]  # the probe's reservation on top of the leases
    assert b.in_flight_seen == [[1, 1]]
    assert [g.in_flight for g in router.groups] == [2, 1]
    for lease in held:
        lease.__exit__(None, None, None)
    assert [g.in_flight for g in router.groups] == [0, 0]


def test_a_probe_waits_at_most_the_probe_timeout_and_at_least_the_minimum():
    a, b = RecordingLink("A"), RecordingLink("B")
    router = DiffusionRouter([a, b])
    lease_addresses(router, 2, deadline=None)
    assert a.timeouts == [PROBE_TIMEOUT_S] and b.timeouts == [PROBE_TIMEOUT_S]
    a.connect_timeout_s = 0.2  # the first group's timeout bounds the wait without a deadline
    lease_addresses(router, 1, deadline=None)
    assert MIN_PROBE_S <= a.timeouts[-1] <= 0.2
    a.connect_timeout_s = 0.0  # no time left: the probe still gets the minimum
    lease_addresses(router, 1, deadline=None)
    assert b.timeouts[-1] == MIN_PROBE_S


def test_without_a_deadline_the_first_groups_connect_timeout_bounds_the_wait():
    a, b = FakeLink("A", False), FakeLink("B", False)
    a.connect_timeout_s, b.connect_timeout_s = 0.3, 30.0
    router = DiffusionRouter([a, b])
    started = time.monotonic()
    with pytest.raises(ServiceError) as err:
        lease_addresses(router, 1, deadline=None)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert 0.3 <= time.monotonic() - started < 10.0  # not the second group's 30 s


def test_repeated_addresses_are_each_named_once_in_order():
    with pytest.raises(ValueError) as err:
        split_addresses("b:2,a:1,b:2,a:1,c:3")
    assert str(err.value) == "--diffusion 'b:2,a:1,b:2,a:1,c:3': a:1, b:2 given more than once"


def test_while_no_group_serves_the_health_checks_are_spaced_by_the_retry_interval():
    a, b = FakeLink("A", False), FakeLink("B", False)
    router = DiffusionRouter([a, b])
    with pytest.raises(ServiceError):
        lease_addresses(router, 1, deadline=0.6)  # 0.4 s to wait, checks 0.1 s apart
    assert 1 <= a.checks <= 6 and 1 <= b.checks <= 6
    # Each check waits at most what is left of the 0.4 s, under HEALTH_CHECK_TIMEOUT_S (0.5 s).
    assert all(0 < t <= 0.4 for t in a.check_timeouts + b.check_timeouts)
