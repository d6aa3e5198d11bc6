"""Continuous batching of text decoding: one thread owns the `TextDecoder`; between two steps it
lets waiting requests join (their prompts are prefilled there, one at a time) and drops those
whose callers went away, so a cancelled request frees its slot within one step and no request
waits for another to finish. Tokens reach each request's asyncio stream as they are chosen.

The model is shared with the KV-prefill worker (`prefill_service.kv_worker`): each join and each
step is one `ModelTurns` turn (`prefill_service.model_turns`), so the decoder's CUDA graph
captures never overlap the worker's CUDA calls."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from bagel.network.model import MixedSequence
from bagel.text.decoding import Sampling, TextDecoder, Token
from prefill_service.model_turns import ModelTurns

log = logging.getLogger(__name__)

# Builds the prompt on the decode thread (ViT and embeddings included): (prompt, next position).
PromptBuilder = Callable[[], tuple[MixedSequence, int]]


@dataclass(frozen=True)
class DecodeJob:
    build: PromptBuilder
    sampling: Sampling
    end_token: int


@dataclass(frozen=True)
class Prefilled:
    """The first item of a stream: the prompt's length and the time its prefill took."""

    prompt_tokens: int
    prefill_s: float


class DecodeStream:
    """One request's items, in order: `Prefilled`, then `Token`s up to the one with a `finish`.
    An error on the decode thread is raised from `__anext__`. `cancel()` (or leaving early)
    takes the request out of the batch before the next step."""

    def __init__(self, scheduler: DecodeScheduler, key: int, queue_position: int) -> None:
        self._scheduler = scheduler
        self.key = key
        self.queue_position = queue_position
        self._queue: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._done = False

    def _put(self, item: object) -> None:  # from the decode thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    @staticmethod
    def _put_all(items: list[tuple[DecodeStream, object]]) -> None:
        """Hand one step's tokens over with one wake-up of each event loop, not one per token:
        every wake-up is a GIL handover between the decode thread and the loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[DecodeStream, object]]] = {}
        for stream, item in items:
            by_loop.setdefault(stream._loop, []).append((stream, item))
        for loop, batch in by_loop.items():
            loop.call_soon_threadsafe(_deliver, batch)

    def __aiter__(self) -> DecodeStream:
        return self

    async def __anext__(self) -> Prefilled | Token:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if isinstance(item, Token) and item.finish is not None:
            self._done = True
        return item

    def cancel(self) -> None:
        if not self._done:
            self._done = True
            self._scheduler.cancel(self.key)


class DecodeScheduler:
    """Owns `decoder` on a thread of its own; `submit` from the event loop. `turns`: shared with
    the model's other users (None: a scheduler alone on its model)."""

    def __init__(self, decoder: TextDecoder, turns: ModelTurns | None = None) -> None:
        self.decoder = decoder
        self.turns = turns or ModelTurns()
        self._lock = threading.Condition()
        self._waiting: deque[tuple[int, DecodeJob, DecodeStream]] = deque()
        self._cancelled: set[int] = set()
        self._streams: dict[int, DecodeStream] = {}
        self._keys = itertools.count()
        self._closed = False
        self.steps = 0
        self._thread = threading.Thread(target=self._run, name="decode", daemon=True)
        self._thread.start()

    @property
    def max_tokens(self) -> int:
        return self.decoder.max_tokens

    def submit(self, job: DecodeJob) -> DecodeStream:
        """Queue `job`; call on the event loop that will read the stream."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the decode scheduler is closed")
            key = next(self._keys)
            stream = DecodeStream(self, key, len(self._waiting))
            self._waiting.append((key, job, stream))
            self._lock.notify()
        return stream

    def cancel(self, key: int) -> None:
        with self._lock:
            self._cancelled.add(key)
            self._lock.notify()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._closed or self._waiting or self.decoder.active):
                    self._lock.wait()
                if self._closed:
                    break
                cancelled, self._cancelled = self._cancelled, set()
                self._waiting = deque(w for w in self._waiting if w[0] not in cancelled)
                joining = []
                free = self.decoder.max_batch - len(self.decoder.active)
                while self._waiting and len(joining) < free:
                    joining.append(self._waiting.popleft())
            for key in cancelled:
                if self.decoder.leave(key):
                    self._streams.pop(key, None)
            for key, job, stream in joining:
                self._join(key, job, stream)
            self._step()
        for stream in self._streams.values():
            stream._put(RuntimeError("the decode scheduler was closed"))

    def _join(self, key: int, job: DecodeJob, stream: DecodeStream) -> None:
        started = time.perf_counter()
        try:
            with self.turns:
                prompt, next_position = job.build()
                first = self.decoder.join(key, prompt, next_position, job.sampling, job.end_token)
        except Exception as e:  # noqa: BLE001 - the request fails, the batch goes on
            log.exception("decode request failed to join")
            stream._put(e)
            return
        stream._put(Prefilled(prompt.embeddings.shape[0], time.perf_counter() - started))
        stream._put(first)
        if first.finish is None:
            self._streams[key] = stream

    def _step(self) -> None:
        if not self.decoder.active:
            return
        try:
            with self.turns:
                tokens = self.decoder.step()
        except Exception as e:  # noqa: BLE001 - a failed step fails every request in it
            log.exception("decode step failed")
            for request in list(self.decoder.active):
                self.decoder.leave(request.key)
                stream = self._streams.pop(request.key, None)
                if stream is not None:
                    stream._put(e)
            return
        self.steps += 1
        delivered = []
        for token in tokens:
            stream = self._streams.get(token.key)
            if stream is None:
                continue
            delivered.append((stream, token))
            if token.finish is not None:
                del self._streams[token.key]
        DecodeStream._put_all(delivered)


def _deliver(batch: list[tuple[DecodeStream, object]]) -> None:
    for stream, item in batch:
        stream._queue.put_nowait(item)
