"""Eight concurrent `openai` SDK clients for 30 s through one gateway: every request is answered,
with an image equal to the gRPC client's for its seed or with a mapped 429 (the gateway's
concurrency limit, or the diffusion service's full queue); none is lost."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator

import numpy as np
import openai
import pytest

from client import BagelClient
from tests.gateway.conftest import PROMPT, SIZE, STEPS, GatewayProcess, http_get, pixels
from tests.gateway.conftest import decoded as decode_b64

CLIENTS = 8
SECONDS = 30.0


@pytest.fixture(scope="module")
def gateway(prefill) -> Iterator[GatewayProcess]:
    with GatewayProcess(prefill.address, "--max-concurrency", "4") as service:
        yield service.wait_serving()


@pytest.mark.slow
def test_eight_sdk_clients_for_30_s_lose_nothing_and_fail_only_with_429(gateway, prefill):
    outcomes: Counter[str] = Counter()
    images: dict[int, list[np.ndarray]] = {i: [] for i in range(CLIENTS)}
    unexpected: list[BaseException] = []
    stop_at = time.monotonic() + SECONDS

    def client_loop(index: int) -> None:
        sdk = gateway.sdk()
        while time.monotonic() < stop_at:
            try:
                reply = sdk.images.generate(
                    prompt=PROMPT, size=SIZE, extra_body={"seed": index, "num_timesteps": STEPS}
                )
            except openai.RateLimitError as e:
                assert e.response.headers["retry-after"]
                outcomes[e.body["code"]] += 1
                time.sleep(0.05)
                continue
            except BaseException as e:  # noqa: BLE001 - reported below
                unexpected.append(e)
                return
            outcomes["served"] += 1
            images[index].append(pixels(decode_b64(reply.data[0].b64_json)))

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SECONDS + 120)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert unexpected == [], unexpected[:3]
    assert outcomes["served"] >= CLIENTS, outcomes
    assert set(outcomes) <= {"served", "concurrency_limit", "resource_exhausted"}, outcomes
    with BagelClient(prefill.address, timeout=120) as client:
        for index, drawn in images.items():
            reference = pixels(
                client.generate(
                    PROMPT, height=128, width=128, seed=index, num_timesteps=STEPS
                ).image
            )
            assert all(np.array_equal(image, reference) for image in drawn), index
    page = http_get(f"{gateway.url}/metrics")[1].decode()
    served = f'bagel_gateway_requests_total{{route="/v1/images/generations",status="200"}} {float(outcomes["served"])}'
    assert served in page
    print(f"gateway load: {CLIENTS} clients x {SECONDS:.0f} s: {dict(outcomes)}")
