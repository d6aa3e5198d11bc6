"""A small `bagel.v1.Diffusion` servicer for testing the prefill service: it assembles each KV
stream with transport's `FrameAssembler`, records what arrived and when, and answers with Accepted,
Progress, Timings and a PNG, or with a chosen status."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from PIL import Image as PILImage

from bagel.network.config import BagelConfig
from protos import DIFFUSION_SERVICE, Accepted, GenerateEvent, Image, KVHeader, Progress, Timings
from protos.options import server_options
from transport import FrameAssembler, KVSpec, ReceivedKV, TransportError, diffusion_handler
from transport import abort as abort_with
from transport.wire import ChunkFrame, parse_frame


@dataclass
class ReceivedCall:
    """One Diffusion.Generate call as the fake saw it."""

    frames: list[tuple[float, str, int]] = field(default_factory=list)  # (time, kind, layer)
    raw: list[bytes] = field(default_factory=list)  # every frame as it arrived
    header: KVHeader | None = None
    received: ReceivedKV | None = None
    completed: bool = False  # sent the image
    cancelled: bool = False  # ended early by the caller (cancel, deadline), not by the fake
    ended: threading.Event = field(default_factory=threading.Event)

    def first_chunk_time(self, layer: int) -> float:
        return min(t for t, kind, lay in self.frames if kind == "chunk" and lay == layer)


class FakeDiffusion:
    """Configure per test with `reset(...)`; `calls` lists what arrived."""

    def __init__(self, config: BagelConfig) -> None:
        llm = config.llm
        self.spec = KVSpec(config.fingerprint(), llm.num_layers, llm.num_kv_heads, llm.head_dim)
        self.calls: list[ReceivedCall] = []
        self.layer0_seen = threading.Event()
        self.fail_with: tuple[grpc.StatusCode, str] | None = None
        self.steps = 3
        self.step_delay_s = 0.0
        self.send_timings = True
        self.address = ""
        self._server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set(DIFFUSION_SERVICE, status)

    def reset(
        self,
        *,
        fail_with: tuple[grpc.StatusCode, str] | None = None,
        steps: int = 3,
        step_delay_s: float = 0.0,
        send_timings: bool = True,
    ) -> None:
        self.calls = []
        self.layer0_seen.clear()
        self.fail_with = fail_with
        self.steps = steps
        self.step_delay_s = step_delay_s
        self.send_timings = send_timings

    async def start(self, port: int = 0) -> str:
        self._server = grpc.aio.server(options=server_options())
        self._server.add_generic_rpc_handlers((diffusion_handler(self.generate),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        await self.set_serving(True)
        port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        await self._server.start()
        self.address = f"127.0.0.1:{port}"
        return self.address

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(None)

    async def generate(
        self, frames: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[GenerateEvent]:
        call = ReceivedCall()
        self.calls.append(call)
        aborted = False
        try:
            try:
                with FrameAssembler(self.spec) as assembler:
                    async for frame in frames:
                        self._record(call, frame)
                        assembler.feed(frame)
                        if call.header is not None and self.fail_with is not None:
                            aborted = True
                            await context.abort(*self.fail_with)
                    call.received = assembler.finish()
            except TransportError as e:
                aborted = True
                await abort_with(context, e)
            params = call.received.params
            yield GenerateEvent(accepted=Accepted(request_id=call.received.request_id))
            for step in range(1, self.steps + 1):
                await asyncio.sleep(self.step_delay_s)
                yield GenerateEvent(progress=Progress(step=step, total_steps=self.steps))
            if self.send_timings:
                yield GenerateEvent(timings=Timings(receive_ms=1.5, denoise_ms=2.5, decode_ms=0.5))
            yield GenerateEvent(
                image=Image(
                    png=png_bytes(params.width, params.height),
                    width=params.width,
                    height=params.height,
                    seed=params.seed,
                )
            )
            call.completed = True
        finally:
            call.cancelled = not call.completed and not aborted
            call.ended.set()

    def _record(self, call: ReceivedCall, frame: bytes) -> None:
        message = parse_frame(frame)
        now = time.perf_counter()
        call.raw.append(bytes(frame))
        if isinstance(message, ChunkFrame):
            call.frames.append((now, "chunk", message.layer))
            if message.layer == 0:
                self.layer0_seen.set()
        elif isinstance(message, KVHeader):
            call.header = message
            call.frames.append((now, "header", -1))
        else:
            call.frames.append((now, "trailer", -1))


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (width, height), (200, 100, 50)).save(buffer, format="PNG")
    return buffer.getvalue()
