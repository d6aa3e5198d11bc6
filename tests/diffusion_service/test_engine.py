"""Rank 0's engine alone: how a job's failure reaches its caller (`Engine._report_failure`)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import grpc
import pytest

from diffusion_service.engine import Engine
from diffusion_service.worker import JobCancelled
from serving.errors import ServiceError
from transport.errors import Fault, TransportError


class _Handle:
    request_id = "r1"

    def __init__(self) -> None:
        self.events: list[object] = []

    def emit(self, item: object) -> None:
        self.events.append(item)

    def stop_reason(self) -> ServiceError:
        return ServiceError(grpc.StatusCode.CANCELLED, "request r1 was cancelled")


def _report(error: Exception, stopping: bool = False) -> tuple[list[object], int]:
    """What the caller is told about `error`, and how often the group was restarted."""
    restarts = []
    stop = threading.Event()
    if stopping:
        stop.set()
    engine = SimpleNamespace(_stop=stop, _restart=lambda: restarts.append(1))
    handle = _Handle()
    Engine._report_failure(engine, handle, error)
    return handle.events, len(restarts)


def _status(events: list[object]) -> tuple[grpc.StatusCode, str]:
    (event,) = events
    assert isinstance(event, ServiceError)
    return event.code, event.message


def test_a_cancelled_job_is_the_callers_stop_reason_or_unavailable_when_shutting_down():
    events, restarts = _report(JobCancelled("stopped after step 2 of 4"))
    assert _status(events) == (grpc.StatusCode.CANCELLED, "request r1 was cancelled")
    events, restarts = _report(JobCancelled("stopped"), stopping=True)
    assert _status(events) == (grpc.StatusCode.UNAVAILABLE, "the diffusion service shut down")
    assert restarts == 0


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("gloo: connection closed"),
        TransportError(Fault.UNAVAILABLE, "rank 1 did not join the broadcast"),
    ],
)
def test_a_failed_collective_is_unavailable_and_restarts_the_group(error):
    events, restarts = _report(error)
    code, message = _status(events)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert message == f"a diffusion rank failed: {error}"
    assert restarts == 1


def test_a_service_error_keeps_its_own_status_and_anything_else_goes_to_the_caller_as_is():
    unusable = ServiceError(grpc.StatusCode.DATA_LOSS, "job 7: NaN latents")
    assert _report(unusable) == ([unusable], 0)
    bug = KeyError("oops")
    assert _report(bug) == ([bug], 0)  # the servicer's `status_of` makes it INTERNAL
