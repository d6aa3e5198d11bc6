"""The text-decoding schema: `TextSampling`, one dataclass whose fields carry their codecs (as
`serving.params.GenerationParams` does), from which the proto conversion, validation, the
client's keyword arguments and the CLI flags derive. Used by Understand (`sampling`) and by a
think request's plan (`think_sampling`)."""

from __future__ import annotations

import argparse
import dataclasses
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from protos import params_pb2
from serving.codecs import (
    BoolCodec,
    FloatCodec,
    IntCodec,
    Range,
    fields_from_message,
    fields_to_message,
)
from serving.errors import InvalidParams
from serving.params import MAX_SEED, spec

# The reference's `gen_text` settings (`max_think_token_n`, `text_temperature`); a test pins
# them to `bagel.text.decoding`'s.
MAX_NEW_TOKENS = 1000
TEMPERATURE = 0.3
MAX_TOP_K = 1_000_000
# The schema's own ceiling; a service's decoder may hold fewer (prompt + new tokens).
MAX_NEW_TOKENS_LIMIT = 32_768


@dataclass(frozen=True)
class TextSampling:
    """How text is decoded. Defaults are the reference's: greedy, at most 1000 new tokens; with
    `do_sample`, temperature 0.3 and neither top-k nor top-p."""

    max_new_tokens: int = field(
        default=MAX_NEW_TOKENS,
        metadata=spec(IntCodec(), "most tokens to decode", bounds=Range(1, MAX_NEW_TOKENS_LIMIT)),
    )
    do_sample: bool = field(
        default=False, metadata=spec(BoolCodec(), "sample the tokens (default: greedy argmax)")
    )
    temperature: float = field(
        default=TEMPERATURE,
        metadata=spec(
            FloatCodec(), "with --do-sample: softmax(logits / T), T > 0", bounds=Range(0, 100)
        ),
    )
    top_p: float = field(
        default=1.0,
        metadata=spec(
            FloatCodec(),
            "with --do-sample: keep the smallest set of tokens holding this mass",
            bounds=Range(0.0, 1.0, lo_open=True),
        ),
    )
    top_k: int = field(
        default=0,
        metadata=spec(
            IntCodec(),
            "with --do-sample: keep the k most likely tokens (0: all)",
            bounds=Range(0, MAX_TOP_K),
        ),
    )
    seed: int = field(
        default=0,
        metadata=spec(
            IntCodec(),
            "with --do-sample: the sampler's seed (unset: the server picks one)",
            bounds=Range(0, MAX_SEED),
        ),
    )

    def validate(self) -> None:
        """Raise InvalidParams naming the first bad field."""
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            meta["codec"].check(f.name, value)
            if meta["bounds"] is not None:
                meta["bounds"].check(f.name, value)
        if self.do_sample and self.temperature <= 0:
            raise InvalidParams(
                f"temperature={self.temperature!r} must be > 0 when do_sample is on"
            )

    @classmethod
    def from_proto(
        cls, msg: params_pb2.TextSampling, defaults: Mapping[str, Any] | None = None
    ) -> TextSampling:
        """Unset fields take `defaults`, then the defaults above; an unset seed a random one."""
        values = {**(defaults or {}), **fields_from_message(cls, msg)}
        if not msg.HasField("seed"):
            values["seed"] = secrets.randbelow(2**31)
        return cls(**values)

    def to_proto(self) -> params_pb2.TextSampling:
        return fields_to_message(self, params_pb2.TextSampling())

    def as_dict(self) -> dict[str, Any]:
        """Field name -> value (the keyword arguments of `bagel.text.decoding.Sampling`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def sampling_message(prefix: str = "", **values: Any) -> params_pb2.TextSampling:
    """A `TextSampling` message from keyword arguments named as the schema's fields after
    `prefix` (e.g. `think_temperature`); None leaves a field unset. Unknown names raise
    TypeError, a value of the wrong type TypeError."""
    names = {prefix + f.name: f for f in dataclasses.fields(TextSampling)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")
    msg = params_pb2.TextSampling()
    for name, value in values.items():
        if value is None:
            continue
        f = names[name]
        codec = f.metadata["codec"]
        codec.to_proto(msg, f.name, codec.from_user(name, value))
    return msg


def sampling_names(prefix: str = "") -> frozenset[str]:
    """The keyword arguments `sampling_message` takes."""
    return frozenset(prefix + f.name for f in dataclasses.fields(TextSampling))


def add_sampling_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """One flag per schema field (`--temperature`, or `--think-temperature` with a prefix);
    every flag defaults to unset, i.e. the server's default, which its help states."""
    group = parser.add_argument_group(f"{prefix.replace('_', ' ')}text sampling".strip())
    for f in dataclasses.fields(TextSampling):
        help_text = f.metadata["help"]
        if "default:" not in help_text and "unset:" not in help_text:
            help_text = f"{help_text} (default: {f.default})"
        meta = {**f.metadata, "help": help_text, "flags": ()}
        f.metadata["codec"].add_argument(group, prefix + f.name, meta)


def sampling_from_cli(args: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
    """The keyword arguments the command line asks for (unset: None), named with `prefix`."""
    return {
        prefix + f.name: f.metadata["codec"].from_cli(args, prefix + f.name)
        for f in dataclasses.fields(TextSampling)
    }
