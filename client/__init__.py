"""Python client for the BAGEL serving stack: `BagelClient` over the `bagel.v1.Prefill` stub, and
the `python -m client` command line."""

from client.client import BagelClient, EventStream, GenerationResult, IncompleteGeneration
from client.request import PARAM_NAMES, build_request
from client.text import IncompleteAnswer, TextResult

__all__ = [
    "PARAM_NAMES",
    "BagelClient",
    "EventStream",
    "GenerationResult",
    "IncompleteAnswer",
    "IncompleteGeneration",
    "TextResult",
    "build_request",
]
