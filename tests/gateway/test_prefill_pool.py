"""`PrefillPool`: each request goes to the prefill service with the fewest of the gateway's
requests in flight, taking turns among equals; readiness reports each service's health."""

from __future__ import annotations

import asyncio
import contextlib

from gateway.prefill_pool import PrefillPool
from serving.service.security import ClientSecurity
from tests.client.fake_prefill import FakePrefillServer
from tests.helpers.ranks import free_port

ADDRESSES = ("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3")


def test_requests_go_to_the_least_busy_service_taking_turns_among_equals():
    async def check() -> None:
        pool = PrefillPool(ADDRESSES, ClientSecurity(), None)
        try:
            picked = []
            async with contextlib.AsyncExitStack() as held:
                for _ in range(4):  # all idle, then each busy once: 1, 2, 3, then 1 again
                    client = await held.enter_async_context(pool.lease())
                    picked.append(client.address)
                assert pool.in_flight == [2, 1, 1]
            assert picked == [*ADDRESSES, ADDRESSES[0]]
            assert pool.in_flight == [0, 0, 0]
            async with pool.lease() as first:
                async with pool.lease() as second:
                    pass
                async with pool.lease() as third:  # the turn moved on past `second`
                    pass
            assert (first.address, second.address, third.address) == (
                ADDRESSES[1],
                ADDRESSES[2],
                ADDRESSES[0],
            )
        finally:
            await pool.close()

    asyncio.run(check())


def test_statuses_name_each_services_health():
    fake = FakePrefillServer()
    fake.set_health("SERVING")
    dead = f"127.0.0.1:{free_port()}"

    async def check() -> dict[str, str]:
        pool = PrefillPool((fake.address, dead), ClientSecurity(), None)
        try:
            return await pool.statuses()
        finally:
            await pool.close()

    try:
        statuses = asyncio.run(check())
    finally:
        fake.stop()
    assert statuses == {fake.address: "SERVING", dead: "error:UNAVAILABLE"}
