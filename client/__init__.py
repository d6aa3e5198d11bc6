"""Python client for the BAGEL serving stack: `BagelClient` over the `bagel.v1.Prefill` stub, its
asyncio twin `AsyncBagelClient`, and the `python -m client` command line."""

from client.async_client import AsyncBagelClient, AsyncEventStream
from client.client import BagelClient, EventStream
from client.errors import BagelError
from client.events import GenerationResult, IncompleteGeneration
from client.request import PARAM_NAMES, build_request
from client.text import IncompleteAnswer, TextResult

__all__ = [
    "PARAM_NAMES",
    "AsyncBagelClient",
    "AsyncEventStream",
    "BagelError",
    "BagelClient",
    "EventStream",
    "GenerationResult",
    "IncompleteAnswer",
    "IncompleteGeneration",
    "TextResult",
    "build_request",
]
