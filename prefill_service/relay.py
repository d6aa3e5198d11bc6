"""Relay: push a request's KV frames to the diffusion service as a `Diffusion.Generate` client stream
while they are being computed, and pass the diffusion service's events back to the caller.

The frames are computed on the service's KV-prefill worker (`prefill_service.kv_worker`), never
on a request thread. The downstream call uses gRPC's synchronous client: gRPC pulls the frames
from the job's bounded buffer on its own request thread, so layer l+1 is computed while layer l
is on the wire, with HTTP/2 flow control as backpressure. (The asyncio client reports INTERNAL
"Internal error from Core" instead of the server's status when the server ends the call while a
write is in flight, grpc/grpc#36066; the diffusion service does exactly that when it rejects a
stream early, and its status must reach the caller unchanged.) A thread per call reads the
events and hands them to the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from prefill_service.kv_worker import KVJob, KVWorker
from prefill_service.prefill import PrefillStats
from protos import DIFFUSION_SERVICE, GenerateEvent, Timings
from protos.options import channel_options
from serving.errors import ServiceError
from serving.service.security import ClientSecurity, TokenHolder
from transport import diffusion_generate

# gRPC's own reconnect backoff (1 s initial by default) would waste most of a short deadline.
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
DEFAULT_CONNECT_TIMEOUT_S = 10.0
# A channel replaced by `DiffusionLink.reopen` (new TLS files) closes this much later, so that the
# calls it carries finish on it; closing it earlier would cancel them.
RETIRED_CHANNEL_CLOSE_S = 600.0
DEADLINE_MARGIN_S = 0.2  # answer UNAVAILABLE this long before the caller's deadline fires
HEALTH_POLL_S = 1.0  # how often the background check asks the diffusion service's health
HEALTH_CHECK_TIMEOUT_S = 0.5
HEALTH_RETRY_S = 0.1  # how often a request waiting for the diffusion service asks again
SERVING = health_pb2.HealthCheckResponse.SERVING
log = logging.getLogger(__name__)


def connect_budget(deadline_s: float | None, connect_timeout_s: float) -> tuple[float, bool]:
    """Seconds to wait for a diffusion service: the caller's remaining time less a margin (unless
    that leaves too little) or `connect_timeout_s`, whichever is less; and whether the deadline
    set it."""
    if deadline_s is not None:
        room = deadline_s - DEADLINE_MARGIN_S if deadline_s > 2 * DEADLINE_MARGIN_S else deadline_s
        if room < connect_timeout_s:
            return max(room, 0.0), True
    return connect_timeout_s, False


class DiffusionLink:
    """The channel to the diffusion service: waits for a connection (gRPC retries with backoff,
    0.1 s growing to 1 s) and for the service's health to say SERVING, inside a budget, and opens
    `Diffusion.Generate` calls whose requests are serialized frames. `watch` polls the service's
    health in the background; `serving` is the last answer (None before the first)."""

    def __init__(
        self,
        address: str,
        *,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        security: ClientSecurity | None = None,  # TLS/mTLS and token of the hop; files read here
        token: TokenHolder | None = None,  # the hop's token, when it may be replaced at run time
    ) -> None:
        self.address = address
        self.connect_timeout_s = connect_timeout_s
        self._security = security or ClientSecurity()
        self._token = token
        self.channel = self._security.open_channel(
            address, channel_options() + RECONNECT_OPTIONS, token
        )
        self.serving: bool | None = None
        self._on_change: Callable[[bool], Awaitable[None]] | None = None
        self._poller: asyncio.Task | None = None

    def watch(self, on_change: Callable[[bool], Awaitable[None]]) -> None:
        """Ask the diffusion service's health every `HEALTH_POLL_S` from now on, and await
        `on_change(serving)` whenever the answer changes."""
        self._on_change = on_change
        self._poller = asyncio.ensure_future(self._poll())

    async def _poll(self) -> None:
        while True:
            await self.check_health()
            await asyncio.sleep(HEALTH_POLL_S)

    async def check_health(self, timeout: float = HEALTH_CHECK_TIMEOUT_S) -> bool:
        """Ask the diffusion service's health once; records and returns whether it is SERVING
        (no answer within `timeout` counts as not serving)."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[bool] = loop.create_future()
        call = health_pb2_grpc.HealthStub(self.channel).Check.future(
            health_pb2.HealthCheckRequest(service=DIFFUSION_SERVICE), timeout=max(timeout, 0.01)
        )

        def done(call: grpc.Future) -> None:  # on a gRPC thread
            try:
                serving = call.result().status == SERVING
            except (grpc.RpcError, grpc.FutureCancelledError):
                serving = False
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
                loop.call_soon_threadsafe(lambda: answer.done() or answer.set_result(serving))

        call.add_done_callback(done)
        try:
            serving = await answer
        except asyncio.CancelledError:
            call.cancel()
            raise
        await self._record(serving)
        return serving

    async def _record(self, serving: bool) -> None:
        if serving != self.serving:
            self.serving = serving
            log.info(
                "diffusion service at %s is %s",
                self.address,
                "SERVING" if serving else "NOT_SERVING",
            )
            if self._on_change is not None:
                await self._on_change(serving)

    async def connect(self, deadline_s: float | None) -> None:
        """Return once the channel is READY and the diffusion service is SERVING; wait at most
        the caller's remaining time (less a margin, unless that leaves too little) or
        `connect_timeout_s`. A service that cannot be reached, or is not serving, is UNAVAILABLE
        naming the address; a deadline that ran out while the connection was still being set up,
        with no attempt failed, is DEADLINE_EXCEEDED."""
        started = time.monotonic()
        budget, deadline_bound = connect_budget(deadline_s, self.connect_timeout_s)
        await self._wait_ready(budget, deadline_bound)
        if self.serving:
            return
        # Not serving at the last look (loading, restarting) or not asked yet: ask until it is.
        end = started + budget
        while not await self.check_health(min(HEALTH_CHECK_TIMEOUT_S, end - time.monotonic())):
            left = end - time.monotonic()
            if left <= 0:
                raise ServiceError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"diffusion service at {self.address} is not serving (loading or restarting)",
                )
            await asyncio.sleep(min(HEALTH_RETRY_S, left))

    async def probe(self, timeout: float) -> bool:
        """Whether a call can start here now: the last health check said SERVING and the channel
        is connected, or connects within `timeout`. A failed connection attempt (the service
        went away since the last check) records it as not serving at once."""
        if not self.serving:
            return False
        loop = asyncio.get_running_loop()
        settled: asyncio.Future[grpc.ChannelConnectivity] = loop.create_future()

        def on_change(state: grpc.ChannelConnectivity) -> None:  # on a gRPC thread
            if state in (
                grpc.ChannelConnectivity.READY,
                grpc.ChannelConnectivity.TRANSIENT_FAILURE,
            ):
                with contextlib.suppress(RuntimeError):  # the loop is closed
                    loop.call_soon_threadsafe(lambda: settled.done() or settled.set_result(state))

        self.channel.subscribe(on_change, try_to_connect=True)
        try:
            state = await asyncio.wait_for(settled, timeout)
        except TimeoutError:
            return False
        finally:
            self.channel.unsubscribe(on_change)
        if state is not grpc.ChannelConnectivity.READY:
            await self._record(False)
        return bool(self.serving) and state is grpc.ChannelConnectivity.READY

    async def _wait_ready(self, budget: float, deadline_bound: bool) -> None:
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        failures = 0
        last = grpc.ChannelConnectivity.IDLE

        def on_change(state: grpc.ChannelConnectivity) -> None:  # on a gRPC thread
            nonlocal failures, last
            last = state
            if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                failures += 1
            elif state is grpc.ChannelConnectivity.READY:
                loop.call_soon_threadsafe(ready.set)

        started = time.monotonic()
        self.channel.subscribe(on_change, try_to_connect=True)
        try:
            await asyncio.wait_for(ready.wait(), budget)
        except TimeoutError:
            waited = time.monotonic() - started
            if deadline_bound and failures == 0:
                raise ServiceError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"deadline exceeded while connecting to the diffusion service at "
                    f"{self.address} ({waited:.2f} s, channel {last.name})",
                ) from None
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                f"diffusion service at {self.address} is unavailable: not connected after "
                f"{waited:.1f} s ({failures} failed attempts, channel {last.name})",
            ) from None
        finally:
            self.channel.unsubscribe(on_change)

    def open_call(self, frames: Iterator[bytes], timeout: float | None) -> grpc.Call:
        """Start the call; gRPC consumes `frames` on its own thread. The result iterates events."""
        return diffusion_generate(self.channel)(frames, timeout=timeout)

    def reopen(self) -> None:
        """A new channel from the TLS files as they are now (call on the event loop); the old one
        carries its calls in flight to their end and closes `RETIRED_CHANNEL_CLOSE_S` later."""
        old = self.channel
        self.channel = self._security.open_channel(
            self.address, channel_options() + RECONNECT_OPTIONS, self._token
        )
        asyncio.get_running_loop().call_later(RETIRED_CHANNEL_CLOSE_S, old.close)

    def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        self.channel.close()


@dataclass
class SendStats:
    bytes_sent: int = 0
    send_s: float | None = None  # first frame handed to gRPC -> the last one accepted


class FrameFeed:
    """The request iterator gRPC pulls frames from (on its request thread): the batches of a
    `KVJob`, flattened. Measures the send, and turns a failure of the KV computation into a
    cancel of the call plus `error`, which the relay reports instead of the CANCELLED status
    that follows. `stop()` (or the call ending) cancels the job."""

    def __init__(self, job: KVJob, stats: SendStats) -> None:
        self._job = job
        self.stats = stats
        self.error: BaseException | None = None
        self._call: grpc.Call | None = None
        self._attached = threading.Event()

    def attach(self, call: grpc.Call) -> None:
        self._call = call
        self._attached.set()

    def stop(self) -> None:
        """Compute no further layer."""
        self._job.cancel()

    def _call_active(self) -> bool:
        return self._call is None or self._call.is_active()

    def _cancel_call(self) -> None:
        self._attached.wait(10)
        if self._call is not None:
            self._call.cancel()

    def __iter__(self) -> Iterator[bytes]:
        started = None
        try:
            for batch in self._job.batches(self._call_active):
                for frame in batch:
                    if started is None:
                        started = time.perf_counter()
                    yield frame
                    self.stats.bytes_sent += len(frame)
                if self._job.cancelled:
                    break
            if not self._job.complete:
                # Stopped early: cancel, so that the stream never ends as if it were whole.
                self._cancel_call()
                return
        except Exception as e:  # noqa: BLE001 - reported by the relay, not by gRPC's logger
            self.error = e
            self._cancel_call()
            return
        finally:
            self._job.cancel()  # a no-op once the job has run to its end
        if started is not None:
            self.stats.send_s = time.perf_counter() - started


class _End:
    pass


async def _events(call: grpc.Call) -> AsyncIterator[GenerateEvent]:
    """The call's events, read on a thread of their own; raises the call's grpc.RpcError."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[GenerateEvent | _End | grpc.RpcError] = asyncio.Queue()

    def post(item: GenerateEvent | _End | grpc.RpcError) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def read() -> None:
        try:
            for event in call:
                post(event)
            post(_End())
        except grpc.RpcError as e:
            post(e)

    threading.Thread(target=read, name="diffusion-events", daemon=True).start()
    while True:
        item = await queue.get()
        if isinstance(item, _End):
            return
        if isinstance(item, grpc.RpcError):
            raise item
        yield item


def with_prefill_timings(
    timings: Timings, prefill_ms: float, stats: SendStats, started: float | None = None
) -> Timings:
    """`timings` plus this service's phases: the KV compute, the send window and, from
    `started` (a `time.perf_counter()` reading when the request arrived), the total so far."""
    merged = Timings()
    merged.CopyFrom(timings)
    merged.prefill_ms = prefill_ms
    if stats.send_s is not None:
        merged.kv_send_ms = stats.send_s * 1000
    if started is not None:
        merged.total_ms = (time.perf_counter() - started) * 1000
    return merged


async def relay(
    link: DiffusionLink,
    batches: Iterator[list[bytes]],
    *,
    worker: KVWorker,
    time_remaining: Callable[[], float | None],
    prefill: PrefillStats,
    sent: SendStats,
    started: float | None = None,
) -> AsyncIterator[GenerateEvent]:
    """Stream the frames of `batches` to the diffusion service (`worker` computes them while gRPC
    sends the ones before) and yield its events, with this service's `prefill_ms` and
    `kv_send_ms` added to the Timings event (or to a Timings event of its own before the image,
    if the diffusion service sends none).

    Nothing is computed until the diffusion service is connected. A status from the diffusion
    service is raised as a ServiceError with the same code and message, a failure of the KV
    computation as itself; ending the iteration early (client cancel or deadline) cancels the
    downstream call and stops the computation. `time_remaining()` is the caller's remaining
    deadline in seconds (None: no deadline); `started` (when the request arrived) gives the
    Timings event its `total_ms`."""
    await link.connect(time_remaining())
    job = worker.submit(batches)
    try:
        feed = FrameFeed(job, sent)
        call = link.open_call(iter(feed), time_remaining())
    except BaseException:
        job.cancel()
        raise
    feed.attach(call)

    def timings(base: Timings) -> GenerateEvent:
        merged = with_prefill_timings(base, prefill.compute_s * 1000, sent, started)
        return GenerateEvent(timings=merged)

    timings_sent = False
    try:
        async for event in _events(call):
            kind = event.WhichOneof("event")
            if kind == "timings":
                event = timings(event.timings)
                timings_sent = True
            elif kind in ("image", "latents") and not timings_sent:
                yield timings(Timings())
                timings_sent = True
            yield event
    except grpc.RpcError as e:
        if feed.error is not None:
            raise feed.error from None
        raise ServiceError(e.code(), e.details() or "") from None
    finally:
        feed.stop()
        call.cancel()
    if feed.error is not None:
        raise feed.error
