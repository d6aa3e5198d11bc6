"""Autoregressive text decoding with the und expert and the LM head, as BAGEL's `gen_text` does,
for many requests at once: continuous batching at token granularity.

Each request holds one slot of a `SlotCache` (its own KV length and RoPE position); a request
joins between steps (its prompt is prefilled alone, its first token sampled from the prefill's
last row) and leaves between steps (its slot is refilled by the last active one, so the active
requests always occupy slots `0 .. B-1` and a step reads one contiguous view). On a GPU the step
over a batch is replayed from a CUDA graph captured per (batch bucket, key-span bucket).

The model knows nothing of requests or services: callers give a `MixedSequence` (the prompt, its
last token `<|im_start|>` as the reference starts decoding) and a `Sampling`, and get token ids.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from bagel.kernels.graphs import graph_or_eager
from bagel.network.layers import rope_cos_sin
from bagel.network.model import Bagel, MixedSequence
from bagel.text.batched_step import SlotCache, bucket, decode_step

MAX_NEW_TOKENS = 1000  # the reference's `max_think_token_n`
TEMPERATURE = 0.3  # the reference's `text_temperature`


@dataclass(frozen=True)
class Sampling:
    """How one request's tokens are chosen. Greedy (argmax) unless `do_sample`; then
    softmax(logits / temperature), restricted to the `top_k` most likely tokens (0: all) and to
    the smallest set whose mass reaches `top_p`, drawn with a generator seeded by `seed`.
    Decoding stops after `end_token` or a `stop_tokens` member (each counted as decoded), or
    after `max_new_tokens`."""

    max_new_tokens: int = MAX_NEW_TOKENS
    do_sample: bool = False
    temperature: float = TEMPERATURE
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop_tokens: tuple[int, ...] = ()


def filtered_probabilities(logits: Tensor, sampling: Sampling) -> Tensor:
    """`[V]` logits -> the sampling distribution (fp32): temperature, then top-k, then top-p."""
    logits = logits.float() / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = logits.softmax(-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep a token while the mass before it is still short of top_p (the first always stays).
        before = sorted_probs.cumsum(-1) - sorted_probs
        drop = order[before >= sampling.top_p]
        probs = probs.index_fill(0, drop, 0.0)
        probs = probs / probs.sum()
    return probs


def choose_token(logits: Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The next token from `[V]` logits."""
    if not sampling.do_sample:
        return int(logits.argmax())
    probs = filtered_probabilities(logits, sampling)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@dataclass
class _Active:
    """One request in the batch."""

    key: Hashable
    slot: int
    sampling: Sampling
    end_token: int
    generator: torch.Generator | None
    kv_len: int  # keys held in its slot
    position: int  # RoPE position of the token it feeds next
    next_token: int  # the token it feeds next (the last one chosen)
    decoded: int = 1  # tokens chosen so far (the first comes from the prefill)


@dataclass(frozen=True)
class Token:
    """A token chosen for request `key`; `finish` is "stop" (it is the end or a stop token) or
    "length" (the request's last allowed token), and the request has then left the batch."""

    key: Hashable
    token: int
    finish: str | None = None


@dataclass
class _Launched:
    """A step on its way: its inputs, its logits (the captured graph's output, valid until the
    next replay) and each row's greedy choice, being copied to the host."""

    inputs: tuple[Tensor, Tensor, Tensor]  # tokens, positions, lengths, on the device
    logits: Tensor  # [rows, vocab]
    greedy: Tensor  # [rows] int64, on the device
    chosen: Tensor  # the same on the host, complete once `done` has passed
    done: torch.cuda.Event | None

    def wait(self) -> list[int]:
        if self.done is not None:
            self.done.synchronize()  # lets other Python threads run while it waits
        return self.chosen.tolist()


class TextDecoder:
    """Decodes the requests that have joined, one token each per `step`. Not thread-safe: one
    thread (a scheduler) calls it. `max_batch` requests at most, each at most `max_tokens` long
    (prompt and decoded tokens together). `graphs`: capture steps as CUDA graphs (None: on a
    GPU).

    With graphs, while every request is greedy, `step` launches the following step before it
    returns: its inputs (the tokens just chosen, positions and lengths one further) are made on
    the device, so the GPU computes it while the caller hands the tokens on. A join or leave
    first waits for that step and drops it; its key/value writes are the ones the next step
    repeats, at positions no request reads yet."""

    MIN_SPAN = 64

    def __init__(
        self, model: Bagel, max_batch: int, max_tokens: int, graphs: bool | None = None
    ) -> None:
        if not model.with_lm_head:
            raise ValueError("text decoding needs the LM head (load_bagel(..., lm_head=True))")
        self.model = model
        self.max_batch = max_batch
        self.max_tokens = max_tokens
        self.cache = SlotCache(model, max_batch, max_tokens)
        self.device = self.cache.keys[0].device
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        self._captured: dict[tuple[int, int], object] = {}
        self._pool = None
        self._ahead: _Launched | None = None
        self.active: list[_Active] = []

    # ---- joining and leaving -------------------------------------------------------------

    def has_room(self) -> bool:
        return len(self.active) < self.max_batch

    def join(
        self,
        key: Hashable,
        prompt: MixedSequence,
        next_position: int,
        sampling: Sampling,
        end_token: int,
    ) -> Token:
        """Prefill `prompt` (RoPE positions up to `next_position - 1`) into a free slot and
        choose the request's first token. Raises ValueError if the batch is full or the prompt
        and its `max_new_tokens` do not fit in `max_tokens`."""
        self._settle()
        length = prompt.embeddings.shape[0]
        if not self.has_room():
            raise ValueError(f"the decoder holds {self.max_batch} requests already")
        if length + sampling.max_new_tokens > self.max_tokens:
            raise ValueError(
                f"{length} prompt tokens + {sampling.max_new_tokens} new tokens exceed the "
                f"decoder's {self.max_tokens}"
            )
        self._ensure(length + 1)
        keys, values, logits = prefill_with_logits(self.model, prompt)
        generator = None
        if sampling.do_sample:
            generator = torch.Generator().manual_seed(sampling.seed)
        token = choose_token(logits, sampling, generator)
        request = _Active(
            key, len(self.active), sampling, end_token, generator, length, next_position, token
        )
        finish = self._finish_of(request, token)
        if finish is None:
            self.cache.fill(request.slot, keys, values)
            self.active.append(request)
        return Token(key, token, finish)

    def leave(self, key: Hashable) -> bool:
        """Drop request `key` (a caller that went away); False if it is not in the batch."""
        self._settle()
        for request in self.active:
            if request.key == key:
                self._remove(request)
                return True
        return False

    def _remove(self, request: _Active) -> None:
        last = self.active[-1]
        if last is not request:
            self.cache.move(last.slot, request.slot, last.kv_len)
            last.slot = request.slot
            self.active[request.slot] = last
        self.active.pop()

    @staticmethod
    def _finish_of(request: _Active, token: int) -> str | None:
        if token == request.end_token or token in request.sampling.stop_tokens:
            return "stop"
        if request.decoded >= request.sampling.max_new_tokens:
            return "length"
        return None

    # ---- one step ------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[Token]:
        """One token for every active request; finished ones leave the batch."""
        if not self.active:
            return []
        launched, self._ahead = self._ahead or self._launch(self._host_inputs()), None
        greedy = launched.wait()
        out = []
        for r in list(self.active):
            if r.sampling.do_sample:
                token = choose_token(launched.logits[r.slot].float(), r.sampling, r.generator)
            else:
                token = greedy[r.slot]
            r.kv_len += 1
            r.position += 1
            r.next_token = token
            r.decoded += 1
            out.append(Token(r.key, token, self._finish_of(r, token)))
        finishing = any(t.finish is not None for t in out)
        if self.graphs and not finishing and not any(r.sampling.do_sample for r in self.active):
            self._ahead = self._launch(self._device_inputs(launched))
        for t in out:
            if t.finish is not None:
                self.leave(t.key)
        return out

    def _host_inputs(self) -> tuple[Tensor, Tensor, Tensor]:
        """The next step's tokens, positions and lengths from the requests' own records."""
        rows = self._rows()
        tokens = torch.zeros(rows, dtype=torch.long)
        positions = torch.zeros(rows, dtype=torch.long)
        lengths = torch.zeros(rows, dtype=torch.long)
        for r in self.active:
            tokens[r.slot], positions[r.slot], lengths[r.slot] = r.next_token, r.position, r.kv_len
        return tuple(x.to(self.device, non_blocking=True) for x in (tokens, positions, lengths))

    def _device_inputs(self, previous: _Launched) -> tuple[Tensor, Tensor, Tensor]:
        """The same, made on the device from the step before: its greedy tokens, and positions
        and lengths one further on the active rows (the padding rows stay at zero)."""
        _, positions, lengths = previous.inputs
        live = (torch.arange(len(positions), device=self.device) < len(self.active)).long()
        return previous.greedy, positions + live, lengths + live

    def _rows(self) -> int:
        count = len(self.active)
        return bucket(count, 1, self.max_batch) if self.graphs else count

    def _launch(self, inputs: tuple[Tensor, Tensor, Tensor]) -> _Launched:
        longest = max(r.kv_len for r in self.active) + 1
        self._ensure(longest)
        span = bucket(longest, self.MIN_SPAN, self.cache.capacity)
        logits = self._forward(self._rows(), span)(*inputs)
        greedy = logits.argmax(-1)
        if self.device.type != "cuda":
            return _Launched(inputs, logits, greedy, greedy, None)
        chosen = torch.empty(greedy.shape, dtype=greedy.dtype, pin_memory=True)
        chosen.copy_(greedy, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return _Launched(inputs, logits, greedy, chosen, done)

    def _settle(self) -> None:
        """Wait for a step launched ahead and drop it: the batch is about to change."""
        if self._ahead is not None:
            self._ahead.wait()
            self._ahead = None

    def _ensure(self, tokens: int) -> None:
        if self.cache.ensure(tokens):
            # The captures read the old tensors. Dropping the last graph of a memory pool frees
            # the pool, so later captures need a new one.
            self._captured.clear()
            self._pool = None

    def _forward(self, rows: int, span: int):
        if not self.graphs:
            return lambda *x: decode_step(self.model, self.cache, span, *x)
        key = (rows, span)
        call = self._captured.get(key)
        if call is None:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            example = (
                torch.zeros(rows, dtype=torch.long, device=self.device),
                torch.zeros(rows, dtype=torch.long, device=self.device),
                torch.zeros(rows, dtype=torch.long, device=self.device),
            )

            def fn(*x: Tensor) -> Tensor:
                return decode_step(self.model, self.cache, span, *x)

            # Capture with zero lengths and tokens: the warm-up writes only position 0 of
            # slots, which every join overwrites; a real step replays it.
            saved = [self._snapshot_zero()]
            call = self._captured[key] = graph_or_eager(fn, example, self._pool)
            self._restore_zero(saved[0])
        return call

    def _snapshot_zero(self) -> list[Tensor]:
        """Position 0 of every slot, which a capture's warm-up overwrites."""
        return [c[:, :, 0].clone() for c in (*self.cache.keys, *self.cache.values)]

    def _restore_zero(self, saved: list[Tensor]) -> None:
        for c, s in zip((*self.cache.keys, *self.cache.values), saved, strict=True):
            c[:, :, 0] = s


def prefill_with_logits(
    model: Bagel, prompt: MixedSequence
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """Run `prompt` through every layer: per layer K and V `[tokens, kv_heads, head_dim]`, and
    the LM head's logits `[vocab]` (fp32) at its last token."""
    llm = model.language_model
    rope = model.config.llm
    cos, sin = rope_cos_sin(prompt.positions, rope.head_dim, rope.rope_theta)
    cos, sin = cos[:, None, :], sin[:, None, :]
    x = prompt.embeddings[None]
    keys, values = [], []
    for layer in model.layers:
        x, k, v = layer.forward_mixed(x, prompt, cos, sin, need_output=True)
        keys.append(k[0])
        values.append(v[0])
    last = llm.model.norm(x[0, -1:])
    return keys, values, llm.lm_head(last)[0].float()


@dataclass
class Decoded:
    """The tokens one request decoded alone, and why it stopped."""

    tokens: list[int] = field(default_factory=list)
    finish: str = ""


def decode(
    model: Bagel,
    prompt: MixedSequence,
    next_position: int,
    sampling: Sampling,
    end_token: int,
    graphs: bool | None = False,
) -> Decoded:
    """One request decoded to its end in a batch of its own (the in-process path)."""
    decoder = TextDecoder(
        model, 1, prompt.embeddings.shape[0] + sampling.max_new_tokens, graphs=graphs
    )
    first = decoder.join(0, prompt, next_position, sampling, end_token)
    result = Decoded([first.token], first.finish or "")
    while decoder.active:
        (token,) = decoder.step()
        result.tokens.append(token.token)
        result.finish = token.finish or ""
    return result
