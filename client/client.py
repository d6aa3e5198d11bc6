"""`BagelClient`: a thin, typed wrapper over the `bagel.v1.Prefill` stub and the standard health
service. One `generate` call runs the whole generation and returns the decoded image."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.errors import Unimplemented, error_from_rpc
from client.events import GenerationResult, ResultAssembler
from client.request import ImageInput, build_request, image_bytes
from client.text import Message, TextResult, collect_answer, understand_request
from protos import GenerateEvent, ModelInfo, ModelInfoRequest, PrefillStub
from protos.options import channel_options
from serving.service.security import open_channel

HEALTH_TIMEOUT_S = 10.0


class EventStream:
    """The events of one Generate call. Iterate it; `cancel()` or `close()` ends the call (the
    server sees CANCELLED), as does leaving a `with` block early. Iteration raises a
    `client.errors.BagelError` (a grpc.RpcError) when the call fails, CANCELLED included;
    `request_id` is the caller's or, once accepted, the server's."""

    def __init__(self, call: Any, request_id: str = "") -> None:
        self._call = call
        self.request_id = request_id

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> GenerateEvent:
        try:
            event = next(self._call)
        except grpc.RpcError as e:
            raise error_from_rpc(e, self.request_id) from None
        if event.WhichOneof("event") == "accepted":
            self.request_id = event.accepted.request_id
        return event

    def cancel(self) -> bool:
        return self._call.cancel()

    close = cancel

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def code(self) -> grpc.StatusCode | None:
        """The call's status once it has ended, else None."""
        return self._call.code() if self._call.done() else None


class BagelClient:
    """A connection to a BAGEL prefill service (or anything serving `bagel.v1.Prefill`).

    `timeout` is the default deadline in seconds of every call; a per-call `timeout` overrides it.
    TLS when `tls_ca` (PEM file verifying the server; else the system roots) or `tls_cert` is
    given; `tls_cert` + `tls_key`: a client certificate for mTLS. `auth_token`: the bearer token
    of every call but health (over plaintext only for loopback or a private network).
    """

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
        self._channel = open_channel(
            address,
            channel_options(),
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            auth_token=auth_token,
        )
        self._stub = PrefillStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._model_info: ModelInfo | None = None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> BagelClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stream(
        self,
        prompt: str,
        *,
        timeout: float | None = None,
        input_images: Sequence[ImageInput] = (),
        **params: Any,
    ) -> EventStream:
        """Start a generation (an edit of `input_images`, if any); yields the raw
        `GenerateEvent`s (Accepted, Progress, Timings, Image).

        `params`: see `client.request.build_request`; unknown names raise TypeError."""
        images = [image_bytes(i) for i in input_images]
        request = build_request(prompt, input_images=images, **params)
        call = self._stub.Generate(request, timeout=self._deadline(timeout))
        return EventStream(call, request.request_id)

    def generate(
        self,
        prompt: str,
        *,
        timeout: float | None = None,
        on_event: Callable[[GenerateEvent], None] | None = None,
        **params: Any,
    ) -> GenerationResult:
        """Run a whole generation and return the image; `on_event` sees every event as it comes
        (e.g. to show progress). A text-to-image request that sets neither height nor width gets
        the model's native size (`model_info`). Raises a `client.errors.BagelError` subclass
        (`InvalidArgument`, `Unavailable`, ...) on failure; cancels the call if interrupted."""
        if not params.get("input_images") and params.get("height") is params.get("width") is None:
            native = self.native_size(timeout=timeout)
            if native:
                params = {**params, "height": native, "width": native}
        assembler = ResultAssembler(str(params.get("request_id") or ""))
        with self.stream(prompt, timeout=timeout, **params) as events:
            for event in events:  # to the end, so a status after the image still raises
                if on_event is not None:
                    on_event(event)
                assembler.add(event)
        return assembler.result(params)

    def edit(
        self,
        image: ImageInput,
        prompt: str,
        *,
        timeout: float | None = None,
        on_event: Callable[[GenerateEvent], None] | None = None,
        **params: Any,
    ) -> GenerationResult:
        """Edit `image` (PNG or JPEG bytes, a path, or a PIL image) as `prompt` says. Unset
        height and width give the input's resized size (longest side at most 1024 for
        BAGEL-7B-MoT); unset CFG settings give BAGEL's editing ones (image guidance 2.0 over the
        whole schedule, text-channel renorm). Otherwise as `generate`."""
        return self.generate(
            prompt, timeout=timeout, on_event=on_event, input_images=[image], **params
        )

    def understand_stream(
        self, messages: Iterable[Message], *, timeout: float | None = None, **params: Any
    ) -> EventStream:
        """Start an Understand call; yields the raw `UnderstandEvent`s (Accepted, deltas,
        TextFinished). `params`: see `client.text.understand_request`."""
        request = understand_request(messages, **params)
        return EventStream(self._stub.Understand(request, timeout=self._deadline(timeout)))

    def chat(
        self,
        messages: str | Iterable[Message],
        *,
        timeout: float | None = None,
        on_text: Callable[[str], None] | None = None,
        **params: Any,
    ) -> TextResult:
        """Answer a message (a str: one user message) or a conversation of (role, content)
        pairs, oldest first; `on_text` sees the text as it is decoded. `params`: `think`,
        `request_id` and the sampling settings (`max_new_tokens`, `do_sample`, `temperature`,
        `top_p`, `top_k`, `seed`). Raises grpc.RpcError on failure."""
        if isinstance(messages, str):
            messages = [("user", messages)]
        with self.understand_stream(messages, timeout=timeout, **params) as events:
            return collect_answer(events, on_text)

    def understand(
        self,
        image: ImageInput,
        question: str,
        *,
        timeout: float | None = None,
        on_text: Callable[[str], None] | None = None,
        **params: Any,
    ) -> TextResult:
        """Answer `question` about `image` (PNG or JPEG bytes, a path, or a PIL image), which
        the model sees through its ViT; otherwise as `chat`."""
        return self.chat([("user", [image, question])], timeout=timeout, on_text=on_text, **params)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The server's grpc.health.v1 status name (SERVING, NOT_SERVING, ...) for `service`
        ("" = the whole server); raises a BagelError if the server cannot be asked."""
        deadline = self._deadline(timeout) or HEALTH_TIMEOUT_S
        try:
            response = self._health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=deadline
            )
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """What the service serves: the model's name, native and largest size, default timesteps
        and guidance, whether it edits, its precision and layout (asked once, then kept).
        Raises `Unimplemented` from a server without GetModelInfo."""
        if self._model_info is None:
            deadline = self._deadline(timeout) or HEALTH_TIMEOUT_S
            try:
                self._model_info = self._stub.GetModelInfo(ModelInfoRequest(), timeout=deadline)
            except grpc.RpcError as e:
                raise error_from_rpc(e) from None
        return self._model_info

    def native_size(self, *, timeout: float | None = None) -> int | None:
        """The model's native side in pixels; None from a server that does not say."""
        try:
            return self.model_info(timeout=timeout).native_size or None
        except Unimplemented:
            return None

    def _deadline(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self.timeout
