"""A TCP proxy on 127.0.0.1 that forwards to one address and can break the connections it carries:
`cut_after(n)` resets every connection once `n` more bytes went upstream (client to server);
`stall_after(n)` stops forwarding both ways (the bytes stay unread, so TCP backpressure reaches
both ends) until `resume()`. It runs on its own event loop thread."""

from __future__ import annotations

import asyncio
import contextlib
import threading

from tests.helpers.event_loop import EventLoopThread

READ_BYTES = 64 << 10


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._loop_thread = EventLoopThread()
        self._lock = threading.Lock()
        self._writers: set[asyncio.StreamWriter] = set()
        self._action: str | None = None  # "cut" or "stall" once armed
        self._left = 0  # upstream bytes until the action
        self._flowing = self._loop_thread.run(self._make_event())
        self.upstream_bytes = 0
        self.triggered = threading.Event()
        self._server = self._loop_thread.run(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port: int = self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @staticmethod
    async def _make_event() -> asyncio.Event:
        event = asyncio.Event()
        event.set()
        return event

    def cut_after(self, nbytes: int) -> None:
        self._arm("cut", nbytes)

    def stall_after(self, nbytes: int) -> None:
        self._arm("stall", nbytes)

    def _arm(self, action: str, nbytes: int) -> None:
        with self._lock:
            self._action, self._left = action, nbytes
        self.triggered.clear()

    def resume(self) -> None:
        """Forward again (after a stall)."""
        self._loop_thread.loop.call_soon_threadsafe(self._flowing.set)

    @property
    def connections(self) -> int:
        return len(self._writers) // 2

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(
            self._pump(reader, up_writer, upstream=True),
            self._pump(up_reader, writer, upstream=False),
            return_exceptions=True,
        )
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.transport.abort()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        while data := await reader.read(READ_BYTES):
            await self._flowing.wait()
            if upstream:
                self.upstream_bytes += len(data)
                if self._count(len(data)):
                    return
            writer.write(data)
            await writer.drain()
            await self._flowing.wait()
        with contextlib.suppress(OSError):
            writer.write_eof()

    def _count(self, nbytes: int) -> bool:
        """Count upstream bytes toward an armed action; True when the connections were cut."""
        with self._lock:
            if self._action is None:
                return False
            self._left -= nbytes
            if self._left > 0:
                return False
            action, self._action = self._action, None
        self.triggered.set()
        if action == "stall":
            self._flowing.clear()
            return False
        for w in list(self._writers):
            w.transport.abort()  # a reset, as a broken network path or a dead peer gives
        return True

    def close(self) -> None:
        async def stop() -> None:
            self._flowing.set()
            self._server.close()
            for w in list(self._writers):
                w.transport.abort()

        self._loop_thread.run(stop())
        self._loop_thread.close()
