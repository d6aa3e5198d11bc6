"""A small synchronous `bagel.v1.Prefill` server for client tests: records each request and
answers with scripted events (or a status), plus a settable grpc.health.v1 service. Understand
answers `answer`'s deltas, then a `TextFinished` with `ANSWER_USAGE` and `ANSWER_TIMINGS`."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from PIL import Image as PILImage

from protos import (
    Accepted,
    GenerateEvent,
    GenerateRequest,
    Image,
    Latents,
    ModelInfo,
    ModelInfoRequest,
    OutputFormat,
    PrefillServicer,
    Progress,
    TextDelta,
    TextFinished,
    Timings,
    UnderstandEvent,
    UnderstandRequest,
    Usage,
    add_PrefillServicer_to_server,
)

# What the fake's TextFinished reports: (prompt, completion) tokens, and the timings in ms.
ANSWER_USAGE = (17, 3)
ANSWER_TIMINGS = {"prefill_ms": 12.34, "decode_ms": 30.56, "total_ms": 45.67}


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (width, height), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


class FakePrefill(PrefillServicer):
    def __init__(self) -> None:
        self.requests: list[GenerateRequest] = []
        self.steps = 3
        self.cached_steps: set[int] = set()  # 1-based steps reported as served from the cache
        self.step_delay_s = 0.0
        self.fail_with: tuple[grpc.StatusCode, str] | None = None
        self.cancelled = threading.Event()
        self.metadata: list[tuple[str, str]] = []  # the last call's
        self.model_info: ModelInfo | None = None  # None: GetModelInfo is UNIMPLEMENTED
        self.model_info_calls = 0
        self.plan = ["a red ", "circle"]  # a think request's plan, before the steps
        self.understand_requests: list[UnderstandRequest] = []
        self.answer = ["The ", "cat", " sleeps."]  # Understand's deltas
        self.finish = True  # False: the stream ends without a TextFinished
        self.fail_after_answer: tuple[grpc.StatusCode, str] | None = None

    def GetModelInfo(self, request: ModelInfoRequest, context: grpc.ServicerContext) -> ModelInfo:
        self.model_info_calls += 1
        if self.model_info is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        return self.model_info

    def Generate(self, request: GenerateRequest, context: grpc.ServicerContext):
        self.requests.append(request)
        self.metadata = [(m.key, m.value) for m in context.invocation_metadata()]
        finished = False

        def on_termination() -> None:  # runs however the call ends
            if not finished and self.fail_with is None:
                self.cancelled.set()

        context.add_callback(on_termination)
        if self.fail_with is not None:
            context.abort(*self.fail_with)
        p = request.params
        width, height = p.width or 32, p.height or 32
        seed = p.seed if p.HasField("seed") else 1234
        yield GenerateEvent(accepted=Accepted(request_id=request.request_id or "srv-1"))
        if request.think:
            for text in self.plan:
                yield GenerateEvent(thinking=TextDelta(text=text))
        for step in range(1, self.steps + 1):
            time.sleep(self.step_delay_s)
            cached = step in self.cached_steps
            yield GenerateEvent(progress=Progress(step=step, total_steps=self.steps, cached=cached))
        yield GenerateEvent(timings=Timings(prefill_ms=12.5, kv_send_ms=3.0, denoise_ms=100.0))
        if p.output_format == OutputFormat.OUTPUT_FORMAT_LATENTS:
            tokens = (width // 16) * (height // 16)
            data = np.arange(tokens * 64, dtype="<f4").tobytes()
            yield GenerateEvent(latents=Latents(data=data, shape=[tokens, 64], seed=seed))
        else:
            yield GenerateEvent(
                image=Image(png=png_bytes(width, height), width=width, height=height, seed=seed)
            )
        finished = True

    def Understand(self, request: UnderstandRequest, context: grpc.ServicerContext):
        self.understand_requests.append(request)
        self.metadata = [(m.key, m.value) for m in context.invocation_metadata()]
        if self.fail_with is not None:
            context.abort(*self.fail_with)
        yield UnderstandEvent(accepted=Accepted(request_id=request.request_id or "srv-2"))
        for text in self.answer:
            time.sleep(self.step_delay_s)
            yield UnderstandEvent(delta=TextDelta(text=text))
        if self.finish:
            prompt, completion = ANSWER_USAGE
            usage = Usage(prompt_tokens=prompt, completion_tokens=completion)
            finished = TextFinished(finish_reason="length", usage=usage, **ANSWER_TIMINGS)
            yield UnderstandEvent(finished=finished)
        if self.fail_after_answer is not None:
            context.abort(*self.fail_after_answer)


class FakePrefillServer:
    def __init__(self) -> None:
        self.servicer = FakePrefill()
        self.health = health.HealthServicer()
        self.server = grpc.server(ThreadPoolExecutor(max_workers=4))
        add_PrefillServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{port}"
        self.server.start()

    def set_health(self, status: str) -> None:
        self.health.set("", health_pb2.HealthCheckResponse.ServingStatus.Value(status))

    def stop(self) -> None:
        self.server.stop(None)


class NoImagePrefill(FakePrefill):
    """Ends the stream successfully with neither an image nor an Accepted event."""

    def Generate(self, request: GenerateRequest, context: grpc.ServicerContext):
        for event in super().Generate(request, context):
            if event.WhichOneof("event") not in ("image", "accepted"):
                yield event
