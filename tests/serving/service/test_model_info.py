"""`serving.service.model_info`: the ModelInfo both services answer, its defaults taken from the request
schema, and `GetModelInfo` failures leaving as the status `status_of` gives."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from protos import ModelInfo, ModelInfoRequest
from serving.errors import ServiceError
from serving.params import GenerationParams
from serving.service.model_info import model_info, model_info_handler


def test_model_info_carries_the_facts_given_and_the_schemas_defaults():
    info = model_info(
        name="tiny",
        fingerprint="abc",
        native_size=128,
        max_size=256,
        size_step=16,
        can_edit=True,
        precision="bf16",
        layout="ulysses 2",
    )
    schema = GenerationParams()
    assert (info.model_name, info.model_fingerprint) == ("tiny", "abc")
    assert (info.native_size, info.max_size, info.size_step) == (128, 256, 16)
    assert info.default_num_timesteps == schema.num_timesteps
    assert info.default_cfg_text_scale == pytest.approx(schema.cfg_text_scale)
    assert info.default_cfg_img_scale == pytest.approx(schema.cfg_img_scale)
    assert (info.can_edit, info.can_understand) == (True, False)
    assert (info.precision, info.layout) == ("bf16", "ulysses 2")
    assert model_info(
        name="t",
        fingerprint="f",
        native_size=1,
        max_size=1,
        size_step=1,
        can_edit=False,
        precision="fp32",
        layout="",
        can_understand=True,
    ).can_understand


class Aborted(Exception):
    pass


class Context:
    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        self.aborted = (code, message)
        raise Aborted


def _call(describe) -> tuple[ModelInfo | None, Context]:
    handler = model_info_handler("bagel.v1.Test", describe)
    details = type("Details", (), {"method": "/bagel.v1.Test/GetModelInfo"})()
    method = handler.service(details)
    assert handler.service(type("D", (), {"method": "/bagel.v1.Test/Other"})()) is None
    assert method.request_deserializer == ModelInfoRequest.FromString
    assert method.response_serializer == ModelInfo.SerializeToString
    context = Context()

    async def run():
        try:
            return await method.unary_unary(ModelInfoRequest(), context)
        except Aborted:
            return None

    return asyncio.run(run()), context


def test_get_model_info_answers_what_describe_returns():
    info = ModelInfo(model_name="tiny")

    async def describe() -> ModelInfo:
        return info

    answer, context = _call(describe)
    assert answer is info and context.aborted is None


def test_a_service_error_leaves_with_its_status_logged_as_info(caplog):
    async def describe() -> ModelInfo:
        raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the model is loading")

    with caplog.at_level(logging.INFO, logger="serving.service.model_info"):
        answer, context = _call(describe)
    assert answer is None
    assert context.aborted == (grpc.StatusCode.UNAVAILABLE, "the model is loading")
    [record] = caplog.records
    assert record.levelno == logging.INFO
    assert record.getMessage() == "GetModelInfo: UNAVAILABLE: the model is loading"


def test_a_bug_leaves_as_internal_logged_as_an_error(caplog):
    async def describe() -> ModelInfo:
        raise KeyError("x")

    with caplog.at_level(logging.INFO, logger="serving.service.model_info"):
        _, context = _call(describe)
    assert context.aborted == (grpc.StatusCode.INTERNAL, "internal error: KeyError: 'x'")
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert record.getMessage() == "GetModelInfo: INTERNAL: internal error: KeyError: 'x'"
