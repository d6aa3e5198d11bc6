"""Think mode on the images endpoints, through the gateway and both services (real processes on
127.0.0.1, the trained tiny checkpoint), driven by the `openai` SDK's `extra_body`: the plan the
answer reports (`bagel.thinking`) and streams (`*.thinking` events) is the in-process
`Pipeline.plan`, and the image is the one the gRPC client draws from the same think request."""

from __future__ import annotations

import base64

import openai
import pytest

from bagel.pipeline import Pipeline
from bagel.text.decoding import Sampling
from client import BagelClient
from tests.gateway.conftest import MODEL, PROMPT, SIZE, STEPS

PLAN_TOKENS = 10
THINK = {"think": True, "think_max_new_tokens": PLAN_TOKENS, "num_timesteps": STEPS}


@pytest.fixture(scope="module")
def expected_plan() -> str:
    plan = Pipeline(MODEL, "cpu").plan(PROMPT, Sampling(PLAN_TOKENS))
    assert plan  # a test of the plan's path needs a plan
    return plan


def grpc_think(prefill, **params):
    with BagelClient(prefill.address, timeout=120) as client:
        return client.generate(PROMPT, height=128, width=128, **params)


def test_a_think_generation_reports_the_pipelines_plan_and_draws_from_it(
    sdk, prefill, expected_plan
):
    reply = sdk.images.generate(prompt=PROMPT, size=SIZE, extra_body={"seed": 11, **THINK})
    [image] = reply.data
    bagel = image.model_extra["bagel"]
    assert bagel["thinking"] == expected_plan
    reference = grpc_think(prefill, seed=11, **THINK)
    assert reference.thinking == expected_plan
    assert base64.b64decode(image.b64_json) == reference.png
    assert reply.usage.output_tokens == reference.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.input_tokens + reply.usage.output_tokens
    plain = sdk.images.generate(
        prompt=PROMPT, size=SIZE, extra_body={"seed": 11, "num_timesteps": STEPS}
    )
    assert "thinking" not in plain.data[0].model_extra["bagel"]
    assert plain.usage.output_tokens == 0
    assert plain.data[0].b64_json != image.b64_json  # the plan changes the image


def test_a_think_stream_sends_the_plan_as_thinking_events_before_the_image(
    sdk, prefill, expected_plan
):
    events = list(
        sdk.images.generate(prompt=PROMPT, size=SIZE, stream=True, extra_body={"seed": 12, **THINK})
    )
    kinds = [e.type for e in events]
    assert kinds[-1] == "image_generation.completed"
    assert set(kinds[:-1]) == {"image_generation.thinking"}
    assert "".join(e.model_extra["delta"] for e in events[:-1]) == expected_plan
    completed = events[-1]
    assert completed.model_extra["bagel"]["thinking"] == expected_plan
    assert base64.b64decode(completed.b64_json) == grpc_think(prefill, seed=12, **THINK).png


def test_a_think_edit_streams_image_edit_thinking_events(sdk, prefill):
    source = grpc_think(prefill, seed=3, num_timesteps=STEPS).png
    events = list(
        sdk.images.edit(
            image=("circle.png", source, "image/png"),
            prompt="make the circle blue",
            size=SIZE,
            stream=True,
            extra_body={"seed": 9, **THINK},
        )
    )
    kinds = [e.type for e in events]
    assert kinds[-1] == "image_edit.completed" and kinds[0] == "image_edit.thinking"
    plan = "".join(e.model_extra["delta"] for e in events[:-1])
    assert events[-1].model_extra["bagel"]["thinking"] == plan


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"think_top_p": 0.0}, "think_top_p"),
        ({"think_max_new_tokens": 0}, "think_max_new_tokens"),
        ({"think": "perhaps"}, "think"),
        ({"think_temprature": 0.5}, "think_temprature"),
    ],
)
def test_a_bad_think_field_gets_a_400_naming_it(sdk, extra, field):
    with pytest.raises(openai.BadRequestError) as error:
        sdk.images.generate(prompt=PROMPT, size=SIZE, extra_body={"think": True, **extra})
    assert field in str(error.value)
