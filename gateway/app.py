"""The FastAPI application: routes, authentication, the concurrency limit and the error handlers.
Each route validates, calls `gateway.drawing`, and answers; errors become OpenAI's JSON in the
handlers below."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.background import BackgroundTask
from starlette.datastructures import UploadFile

from gateway.chat import ChatAnswerer, ChatCompletionRequest
from gateway.drawing import (
    ClientGone,
    Drawing,
    Painter,
    images_response,
    plan,
    until_disconnect,
)
from gateway.errors import OpenAIError, invalid_request
from gateway.metrics import GatewayMetrics
from gateway.middleware import CLIENT_GONE, BodyTooLarge, RequestMiddleware, too_large
from gateway.prefill_pool import PrefillPool
from gateway.schema import ImageEditRequest, ImageGenerationRequest, form_value
from gateway.settings import GatewaySettings

NO_MASK = (
    "mask is not supported: BAGEL edits by instruction (say in the prompt what to change) and "
    "takes no mask"
)


class ConcurrencyLimit:
    """Image requests in flight; one beyond `limit` is refused at once (429), never queued here
    (the diffusion service has the queue)."""

    def __init__(self, limit: int, retry_after_s: int) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.in_flight = 0

    def acquire(self) -> None:
        if self.in_flight >= self.limit:
            raise OpenAIError(
                429,
                f"too many requests in flight ({self.limit}); retry later",
                "rate_limit_error",
                None,
                "concurrency_limit",
                {"Retry-After": str(self.retry_after_s)},
            )
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1


def create_app(settings: GatewaySettings, tokens: tuple[str, ...] = ()) -> FastAPI:
    """The gateway for `settings`; `tokens`: the bearer tokens accepted (none: no authentication).
    The prefill clients are made when the app starts, inside its event loop."""
    metrics = GatewayMetrics()
    limit = ConcurrencyLimit(settings.max_concurrency, settings.retry_after)
    started = int(time.time())
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        pool = PrefillPool(
            settings.prefill_addresses, settings.prefill_security, settings.request_timeout
        )
        state["pool"] = pool
        state["painter"] = Painter(pool, settings.retry_after)
        state["chat"] = ChatAnswerer(pool, settings.model_name, settings.retry_after)
        yield
        await pool.close()

    app = FastAPI(
        title="BAGEL gateway",
        summary="OpenAI-compatible Images and Chat Completions APIs in front of the BAGEL prefill "
        "service",
        version="1",
        lifespan=lifespan,
    )

    @app.exception_handler(OpenAIError)
    async def openai_error(_request: Request, error: OpenAIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        return validation_failure(error.errors()).response()

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(_request: Request, _error: BodyTooLarge) -> JSONResponse:
        return too_large(settings.max_body_bytes).response()

    @app.get("/health", summary="the process lives")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="a prefill service reports SERVING")
    async def ready() -> JSONResponse:
        statuses = await state["pool"].statuses()
        serving = any(s == "SERVING" for s in statuses.values())
        return JSONResponse(
            {"status": "ready" if serving else "not ready", "prefill": statuses},
            status_code=200 if serving else 503,
        )

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        return Response(metrics.page(), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict[str, Any]:
        return {
            "id": settings.model_name,
            "object": "model",
            "created": started,
            "owned_by": "bagel-serve",
        }

    @app.get("/v1/models", summary="the served model")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model}", summary="one model")
    async def model(model: str) -> dict[str, Any]:
        if model != settings.model_name:
            raise OpenAIError(
                404,
                f"the model {model!r} does not exist",
                "invalid_request_error",
                "model",
                "model_not_found",
            )
        return model_card()

    def event_stream_response(stream) -> StreamingResponse:
        """Server-sent events of an open stream: counted in flight, and the stream's resources
        (the concurrency slot among them) released however the response ends."""
        metrics.streams_in_flight.inc()
        stream.resources.callback(metrics.streams_in_flight.dec)
        stream.resources.callback(limit.release)
        return StreamingResponse(
            stream.events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
            background=BackgroundTask(stream.close),  # runs however the response ends
        )

    async def answer(request: Request, drawing: Drawing) -> Response:
        limit.acquire()
        painter: Painter = state["painter"]
        if drawing.stream:
            try:
                stream = await until_disconnect(request.receive, painter.open_stream(drawing))
            except BaseException:
                limit.release()
                raise
            return event_stream_response(stream)
        try:
            results = await until_disconnect(request.receive, painter.images(drawing))
        finally:
            limit.release()
        return JSONResponse(await images_response(drawing, results))

    @app.post(
        "/v1/images/generations",
        summary="draw images from a prompt",
        response_description="ImagesResponse, or server-sent events when stream is true",
    )
    async def generations(request: Request, body: ImageGenerationRequest) -> Response:
        drawing = plan(body, "generation", settings.model_name, request.state.request_id, None)
        try:
            return await answer(request, drawing)
        except ClientGone:
            return Response(status_code=CLIENT_GONE)

    @app.post(
        "/v1/images/edits",
        summary="edit an image as the prompt says",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            **ImageEditRequest.model_json_schema(),
                            "required": ["image", "prompt"],
                        }
                    }
                },
            }
        },
    )
    async def edits(request: Request) -> Response:
        body, image = await edit_form(request)
        drawing = plan(body, "edit", settings.model_name, request.state.request_id, image)
        try:
            return await answer(request, drawing)
        except ClientGone:
            return Response(status_code=CLIENT_GONE)

    @app.post(
        "/v1/chat/completions",
        summary="answer a conversation (text, and images as data URLs)",
        response_description="chat.completion, or chat.completion.chunk events when stream is true",
    )
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        chat: ChatAnswerer = state["chat"]
        request_id = request.state.request_id
        limit.acquire()
        if body.stream:
            try:
                stream = await until_disconnect(request.receive, chat.stream(body, request_id))
            except ClientGone:
                limit.release()
                return Response(status_code=CLIENT_GONE)
            except BaseException:
                limit.release()
                raise
            return event_stream_response(stream)
        try:
            answer = await until_disconnect(request.receive, chat.completion(body, request_id))
        except ClientGone:
            return Response(status_code=CLIENT_GONE)
        finally:
            limit.release()
        return JSONResponse(answer)

    app.add_middleware(
        RequestMiddleware,
        max_body_bytes=settings.max_body_bytes,
        metrics=metrics,
        tokens=tokens,
    )
    return app


def validation_failure(errors: Any) -> OpenAIError:
    """The first of pydantic's complaints, as OpenAI words a bad field."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(where) or None
    if first.get("type") == "missing":
        return invalid_request(f"{param} is required", param)
    if first.get("type") == "extra_forbidden":
        return invalid_request(f"unknown field {param!r}", param)
    message = first.get("msg", "invalid value")
    return invalid_request(f"{param}: {message}" if param else message, param)


async def edit_form(request: Request) -> tuple[Any, bytes]:
    """The multipart body of an edit: its fields as an `ImageEditRequest` and the image's bytes."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise invalid_request("an edit is sent as multipart/form-data", None)
    form = await request.form()
    fields: dict[str, list[str]] = {}
    images: list[UploadFile] = []
    for key, value in form.multi_items():
        name = key.removesuffix("[]")
        if name == "mask":
            raise invalid_request(NO_MASK, "mask")
        if name == "image":
            if not isinstance(value, UploadFile):
                raise invalid_request("image must be a file (PNG or JPEG)", "image")
            images.append(value)
        elif isinstance(value, UploadFile):
            raise invalid_request(f"{name} must be a form field, not a file", name)
        else:
            fields.setdefault(name, []).append(value)
    if not images:
        raise invalid_request("image is required: one PNG or JPEG file", "image")
    if len(images) > 1:
        raise invalid_request("one image is edited at a time; send one image file", "image")
    values = {
        name: form_value(name, texts) if name in ImageEditRequest.model_fields else texts[0]
        for name, texts in fields.items()
    }
    try:
        body = ImageEditRequest.model_validate(values)
    except ValidationError as e:
        raise validation_failure(e.errors()) from None
    return body, await images[0].read()
