"""The prefill services a gateway sends to (`--prefill A,B,...`): one `AsyncBagelClient` each;
a request goes to the one with the fewest of this gateway's requests in flight, taking turns among
equals. Readiness asks each one's health."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from client import AsyncBagelClient, BagelError
from serving.service.security import ClientSecurity, read_token_file

READY_TIMEOUT_S = 2.0


class PrefillPool:
    def __init__(
        self, addresses: Sequence[str], security: ClientSecurity, timeout: float | None
    ) -> None:
        token = read_token_file(security.auth_token_file) if security.auth_token_file else None
        self.clients = [
            AsyncBagelClient(
                address,
                timeout,
                tls_ca=security.tls_ca,
                tls_cert=security.tls_cert,
                tls_key=security.tls_key,
                auth_token=token,
            )
            for address in addresses
        ]
        self.in_flight = [0] * len(self.clients)
        self._turn = 0

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[AsyncBagelClient]:
        """The client to use now, counted in flight until the block ends."""
        n = len(self.clients)
        index = min(range(n), key=lambda i: (self.in_flight[i], (i - self._turn) % n))
        self._turn = (index + 1) % n
        self.in_flight[index] += 1
        try:
            yield self.clients[index]
        finally:
            self.in_flight[index] -= 1

    async def statuses(self) -> dict[str, str]:
        """Each prefill service's health status name (`error:CODE` when it cannot be asked)."""

        async def status(client: AsyncBagelClient) -> str:
            try:
                return await client.health(timeout=READY_TIMEOUT_S)
            except BagelError as e:
                return f"error:{e.code().name}"

        found = await asyncio.gather(*(status(c) for c in self.clients))
        return {c.address: s for c, s in zip(self.clients, found, strict=True)}

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients))
