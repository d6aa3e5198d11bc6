"""`GetModelInfo`, the same on both services: what the service serves (`bagel.v1.ModelInfo`), so
a client takes its defaults (size, timesteps, guidance) from the model instead of guessing.

The defaults come from the request schema (`serving.params.GenerationParams`); the sizes from the
model's geometry and its checkpoint facts (`bagel.checkpoints.model_info`)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import grpc

from protos import ModelInfo, ModelInfoRequest
from serving.errors import status_of
from serving.params import GenerationParams

log = logging.getLogger(__name__)
_SCHEMA = GenerationParams()


def model_info(
    *,
    name: str,
    fingerprint: str,
    native_size: int,
    max_size: int,
    size_step: int,
    can_edit: bool,
    precision: str,
    layout: str,
    can_understand: bool = False,
) -> ModelInfo:
    """A ModelInfo whose default steps and guidance are the request schema's."""
    return ModelInfo(
        model_name=name,
        model_fingerprint=fingerprint,
        native_size=native_size,
        max_size=max_size,
        size_step=size_step,
        default_num_timesteps=_SCHEMA.num_timesteps,
        default_cfg_text_scale=_SCHEMA.cfg_text_scale,
        default_cfg_img_scale=_SCHEMA.cfg_img_scale,
        can_edit=can_edit,
        can_understand=can_understand,
        precision=precision,
        layout=layout,
    )


def model_info_handler(
    service_name: str, describe: Callable[[], Awaitable[ModelInfo]]
) -> grpc.GenericRpcHandler:
    """`SERVICE/GetModelInfo` answered by `describe()`; its exceptions leave through `status_of`
    (e.g. a ServiceError UNAVAILABLE while the model loads). Registered beside the service's other
    handlers: gRPC asks each generic handler in turn for a method."""

    async def get_model_info(
        request: ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> ModelInfo:
        try:
            return await describe()
        except Exception as e:  # noqa: BLE001 - every failure becomes a status, in one place
            code, message = status_of(e)
            log.log(
                logging.ERROR if code is grpc.StatusCode.INTERNAL else logging.INFO,
                "GetModelInfo: %s: %s",
                code.name,
                message,
            )
            await context.abort(code, message)

    method = grpc.unary_unary_rpc_method_handler(
        get_model_info,
        request_deserializer=ModelInfoRequest.FromString,
        response_serializer=ModelInfo.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(service_name, {"GetModelInfo": method})
