"""Which diffusion group serves a request, when the prefill service has several
(`--diffusion A,B,...`): the serving group with the fewest of this service's requests in flight,
taking turns among equals; a group whose health check or connection fails leaves the rotation
until its health says SERVING again.

The load is what this prefill service has in flight to each group, counted here: the diffusion
service publishes its queue depth only as a Prometheus gauge, not over gRPC, so a group that
other clients also use looks less loaded than it is. A request is tried on another group only
while nothing of it has been computed or sent (the chosen group fails to connect); once its KV
stream has started, a group that dies fails it with UNAVAILABLE, as with one group.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc

from prefill_service.metrics import PrefillMetrics
from prefill_service.relay import (
    HEALTH_CHECK_TIMEOUT_S,
    HEALTH_RETRY_S,
    DiffusionLink,
    connect_budget,
)
from serving.errors import ServiceError

PROBE_TIMEOUT_S = 0.5  # a serving group's channel is connected already (health is polled)
MIN_PROBE_S = 0.05  # time for a connected channel's READY to reach the event loop


@dataclass
class DiffusionGroup:
    """One diffusion service (rank group) and this prefill service's requests in flight to it."""

    link: DiffusionLink
    in_flight: int = 0

    @property
    def address(self) -> str:
        return self.link.address

    @property
    def serving(self) -> bool:
        return bool(self.link.serving)


def rotation(groups: Sequence[DiffusionGroup], turn: int) -> list[DiffusionGroup]:
    """The serving groups in the order to try them: fewest requests in flight first; among
    equals, the one whose turn it is (index `turn`, then the next ones, wrapping) first."""
    n = len(groups)
    ranked = sorted((g.in_flight, (i - turn) % n, i) for i, g in enumerate(groups) if g.serving)
    return [groups[i] for _, _, i in ranked]


class GroupLease:
    """A request's hold on its group: counts it in flight until the `with` block ends."""

    def __init__(self, group: DiffusionGroup) -> None:
        self.group = group

    @property
    def link(self) -> DiffusionLink:
        return self.group.link

    def __enter__(self) -> GroupLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.group.in_flight -= 1


class DiffusionRouter:
    """The prefill service's diffusion groups; with one, every request goes to it and waits for
    it as `DiffusionLink.connect` says (the single-address behaviour)."""

    def __init__(
        self, links: Sequence[DiffusionLink], metrics: PrefillMetrics | None = None
    ) -> None:
        if not links:
            raise ValueError("at least one diffusion service address is needed")
        self.groups = [DiffusionGroup(link) for link in links]
        self.metrics = metrics
        self._turn = 0
        if metrics is not None:
            for group in self.groups:
                metrics.routed.labels(diffusion=group.address)  # listed from the start, at 0
                metrics.diffusion_serving.labels(diffusion=group.address).set_function(
                    lambda group=group: float(group.serving)
                )

    @property
    def addresses(self) -> list[str]:
        return [g.address for g in self.groups]

    @property
    def serving(self) -> bool:
        """Whether at least one group's last health check said SERVING."""
        return any(g.serving for g in self.groups)

    def watch(self, on_change: Callable[[bool], Awaitable[None]]) -> None:
        """Poll every group's health in the background; await `on_change(self.serving)` when
        any group's answer changes."""
        for group in self.groups:
            group.link.watch(lambda _serving: on_change(self.serving))

    async def check_health(self) -> bool:
        await asyncio.gather(*(g.link.check_health() for g in self.groups))
        return self.serving

    def describe(self) -> str:
        return ", ".join(
            f"{g.address} ({'serving' if g.serving else 'not serving'}, {g.in_flight} in flight)"
            for g in self.groups
        )

    async def lease(self, deadline_s: float | None) -> GroupLease:
        """The group for the next request, counted in flight from now on (use the lease in a
        `with` block). Several groups: the first of `rotation` that connects; while none does,
        wait for one to say SERVING for at most the caller's remaining time (less a margin) or
        the connect timeout, then UNAVAILABLE naming every group."""
        if len(self.groups) == 1:
            return self._take(self.groups[0])
        budget, _ = connect_budget(deadline_s, self.groups[0].link.connect_timeout_s)
        end = time.monotonic() + budget
        while True:
            for group in rotation(self.groups, self._turn):
                group.in_flight += 1  # reserved while probing: others go elsewhere meanwhile
                left = end - time.monotonic()
                ok = await group.link.probe(max(MIN_PROBE_S, min(PROBE_TIMEOUT_S, left)))
                group.in_flight -= 1
                if ok:
                    return self._take(group)
            left = end - time.monotonic()
            if left <= 0:
                raise ServiceError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"no diffusion service is serving (loading, restarting or unreachable): "
                    f"{self.describe()}",
                )
            await asyncio.gather(
                *(g.link.check_health(min(HEALTH_CHECK_TIMEOUT_S, left)) for g in self.groups)
            )
            if not self.serving:
                await asyncio.sleep(min(HEALTH_RETRY_S, max(0.0, end - time.monotonic())))

    def _take(self, group: DiffusionGroup) -> GroupLease:
        group.in_flight += 1
        if self.metrics is not None:
            self.metrics.routed.labels(diffusion=group.address).inc()
        self._turn = (self.groups.index(group) + 1) % len(self.groups)
        return GroupLease(group)

    def close(self) -> None:
        for group in self.groups:
            group.link.close()


def split_addresses(text: str) -> tuple[str, ...]:
    """`--diffusion A,B,...`: the addresses in order; ValueError on an empty or repeated one."""
    addresses = tuple(a.strip() for a in text.split(","))
    if not all(addresses):
        raise ValueError(f"--diffusion {text!r}: an address is empty")
    repeated = sorted({a for a in addresses if addresses.count(a) > 1})
    if repeated:
        raise ValueError(f"--diffusion {text!r}: {', '.join(repeated)} given more than once")
    return addresses
