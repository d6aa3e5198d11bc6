"""`AsyncBagelClient`: the asyncio twin of `BagelClient` (`grpc.aio`, no thread per call), with the
same request building (`client.request`) and the same result (`client.events`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.client import HEALTH_TIMEOUT_S
from client.errors import error_from_rpc
from client.events import GenerationResult, ResultAssembler
from client.request import ImageInput, build_request, image_bytes
from client.text import Message, TextResult, collect_answer, understand_request
from protos import GenerateEvent, PrefillStub
from protos.options import channel_options
from serving.service.security import open_aio_channel


class AsyncEventStream:
    """The events of one Generate (or Understand) call: `async for` them; `cancel()` ends the call
    (the server sees CANCELLED), as does leaving an `async with` block early. Iteration raises a
    `client.errors.BagelError` (a grpc.RpcError) when the call fails, CANCELLED included, as
    `EventStream` does; `request_id` is the caller's or, once accepted, the server's."""

    def __init__(self, call: grpc.aio.UnaryStreamCall, request_id: str = "") -> None:
        self._call = call
        self.request_id = request_id

    def __aiter__(self) -> AsyncEventStream:
        return self

    async def __anext__(self) -> GenerateEvent:
        try:
            event = await self._call.read()
        except grpc.RpcError as e:
            raise error_from_rpc(e, self.request_id) from None
        if event is grpc.aio.EOF:
            raise StopAsyncIteration
        if event.WhichOneof("event") == "accepted":
            self.request_id = event.accepted.request_id
        return event

    def cancel(self) -> bool:
        return self._call.cancel()

    async def __aenter__(self) -> AsyncEventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


class AsyncBagelClient:
    """A `grpc.aio` connection to a BAGEL prefill service; the arguments are `BagelClient`'s.
    Create it inside the event loop that uses it."""

    def __init__(
        self,
        address: str,
        timeout: float | None = None,
        *,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        auth_token: str | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._channel, self._metadata = open_aio_channel(
            address,
            channel_options(),
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            auth_token=auth_token,
        )
        self._stub = PrefillStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncBagelClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def stream(
        self,
        prompt: str,
        *,
        timeout: float | None = None,
        input_images: Sequence[ImageInput] = (),
        **params: Any,
    ) -> AsyncEventStream:
        """Start a generation (an edit of `input_images`, if any); yields the raw
        `GenerateEvent`s. `params`: see `client.request.build_request`."""
        images = [image_bytes(i) for i in input_images]
        request = build_request(prompt, input_images=images, **params)
        call = self._stub.Generate(
            request, timeout=self._deadline(timeout), metadata=self._metadata or None
        )
        return AsyncEventStream(call, request.request_id)

    async def generate(
        self,
        prompt: str,
        *,
        timeout: float | None = None,
        on_event: Callable[[GenerateEvent], None] | None = None,
        **params: Any,
    ) -> GenerationResult:
        """Run a whole generation and return the image, as `BagelClient.generate`; cancelling
        the awaiting task cancels the call."""
        assembler = ResultAssembler(str(params.get("request_id") or ""))
        async with self.stream(prompt, timeout=timeout, **params) as events:
            async for event in events:
                if on_event is not None:
                    on_event(event)
                assembler.add(event)
        return assembler.result(params)

    async def edit(
        self,
        image: ImageInput,
        prompt: str,
        *,
        timeout: float | None = None,
        on_event: Callable[[GenerateEvent], None] | None = None,
        **params: Any,
    ) -> GenerationResult:
        """Edit `image` as `prompt` says; see `BagelClient.edit`."""
        return await self.generate(
            prompt, timeout=timeout, on_event=on_event, input_images=[image], **params
        )

    def understand_stream(
        self, messages: Iterable[Message], *, timeout: float | None = None, **params: Any
    ) -> AsyncEventStream:
        """Start an Understand call; yields the raw `UnderstandEvent`s. `params`: see
        `client.text.understand_request`."""
        request = understand_request(messages, **params)
        call = self._stub.Understand(
            request, timeout=self._deadline(timeout), metadata=self._metadata or None
        )
        return AsyncEventStream(call, request.request_id)

    async def chat(
        self,
        messages: str | Iterable[Message],
        *,
        timeout: float | None = None,
        on_text: Callable[[str], None] | None = None,
        **params: Any,
    ) -> TextResult:
        """Answer a message or a conversation, as `BagelClient.chat`."""
        if isinstance(messages, str):
            messages = [("user", messages)]
        events = []
        async with self.understand_stream(messages, timeout=timeout, **params) as stream:
            async for event in stream:
                if on_text is not None and event.WhichOneof("event") == "delta":
                    on_text(event.delta.text)
                events.append(event)
        return collect_answer(events)

    async def understand(
        self,
        image: ImageInput,
        question: str,
        *,
        timeout: float | None = None,
        on_text: Callable[[str], None] | None = None,
        **params: Any,
    ) -> TextResult:
        """Answer `question` about `image`, as `BagelClient.understand`."""
        return await self.chat(
            [("user", [image, question])], timeout=timeout, on_text=on_text, **params
        )

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The server's grpc.health.v1 status name for `service` ("" = the whole server); raises a
        BagelError if the server cannot be asked."""
        deadline = self._deadline(timeout) or HEALTH_TIMEOUT_S
        try:
            response = await self._health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=deadline
            )
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def _deadline(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self.timeout
