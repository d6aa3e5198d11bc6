"""`python -m client`: generate an image through a BAGEL prefill service (with a progress bar and a
timing summary), or ask a service for its health."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from tqdm import tqdm

from client.client import BagelClient
from client.errors import BagelError, DeadlineExceeded, Unavailable, Unimplemented
from client.events import GenerationResult, IncompleteGeneration
from client.output import (
    DEFAULT_QUALITY,
    OutputPathError,
    check_writable,
    encode,
    image_format,
)
from client.request import SERVER_PICKS_SEED, THINK_PREFIX
from client.text_cli import add_text_commands, run_text
from protos import GenerateEvent, ModelInfo, Timings
from serving.codecs import flag
from serving.imaging.input_images import EDIT_DEFAULTS
from serving.params import MAX_SEED, GenerationParams
from serving.service.security import SecurityError, read_token_file
from serving.text_params import add_sampling_arguments, sampling_from_cli

DEFAULT_SERVER = "127.0.0.1:50051"
HEALTH_POLL_S = 0.2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m client",
        description="Generate images, answer questions and chat through a BAGEL prefill service, "
        "or check a service's health.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser(
        "generate",
        help="text to image; writes a PNG, JPEG or WebP",
        description="Unset --size/--width/--height give the model's native size and unset "
        "--steps its default timesteps, as the server's GetModelInfo says.",
    )
    gen.add_argument("prompt")
    _add_image_request_args(gen)
    edit = commands.add_parser(
        "edit",
        help="image editing: INPUT (PNG or JPEG) changed as PROMPT says; writes a PNG, JPEG or "
        "WebP",
        description="Unset --width/--height give the input's resized size; unset CFG flags "
        "give BAGEL's editing settings (--cfg-img 2.0 on (0, 1], text-channel renorm).",
    )
    edit.add_argument("input", type=Path, help="the image to edit (PNG or JPEG)")
    edit.add_argument("prompt")
    _add_image_request_args(edit)

    add_text_commands(commands, _add_connection_args)

    health = commands.add_parser("health", help="print the server's health; exit 0 iff SERVING")
    health.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="ask again until SERVING or SECONDS have passed, e.g. while the services start "
        "(default: %(default)s, ask once)",
    )
    _add_connection_args(health)
    return parser


def _add_image_request_args(parser: argparse.ArgumentParser) -> None:
    """The flags `generate` and `edit` share: output, request schema, connection."""
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        type=Path,
        help="image file to write, its format from the extension: .png, .jpg/.jpeg or .webp "
        "(with --output-format latents: a .npy file of the fp32 latents)",
    )
    parser.add_argument(
        "--quality",
        type=int,
        default=DEFAULT_QUALITY,
        help="JPEG and WebP quality, 1..100 (default: %(default)s)",
    )
    parser.add_argument(
        "--size",
        type=int,
        help="square image side in pixels, a multiple of the model's size step (default: the "
        "model's native size; edit: the input's size)",
    )
    add_param_arguments(parser)
    parser.add_argument(
        "--request-id", help="1 to 128 printable ASCII characters (default: the server assigns one)"
    )
    parser.add_argument(
        "--summary-json",
        type=Path,
        metavar="FILE",
        help="write request_id, seed, steps, cached_steps (0-based) and timings as JSON "
        "(default: none)",
    )
    _add_connection_args(parser)


def _add_connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        default=DEFAULT_SERVER,
        help="HOST:PORT of the prefill service (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout", type=float, help="deadline of the call in seconds (default: none)"
    )
    parser.add_argument(
        "--tls-ca",
        metavar="PEM",
        help="use TLS, verifying the server with this CA certificate (default: plaintext)",
    )
    parser.add_argument(
        "--tls-cert",
        metavar="PEM",
        help="use TLS with this client certificate, for mTLS (default: none)",
    )
    parser.add_argument(
        "--tls-key", metavar="PEM", help="private key of --tls-cert (default: none)"
    )
    parser.add_argument(
        "--auth-token-file",
        type=Path,
        metavar="FILE",
        help="send the bearer token in FILE; health needs none (default: no token)",
    )


def connect(args: argparse.Namespace) -> BagelClient:
    """The client the connection flags ask for; raises SecurityError for an unusable file."""
    token = read_token_file(args.auth_token_file) if args.auth_token_file else None
    return BagelClient(
        args.server,
        timeout=args.timeout,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        auth_token=token,
    )


def param_fields() -> dict[str, dataclasses.Field]:
    """The request schema's fields by name (read at each call: a test may extend the schema)."""
    return {f.name: f for f in dataclasses.fields(GenerationParams)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.command in ("generate", "edit"):
        if args.size is not None:
            if args.width is not None or args.height is not None:
                parser.error("--size cannot be combined with --width/--height")
            args.width = args.height = args.size
        if not 1 <= args.quality <= 100:
            parser.error(f"--quality {args.quality}: must be in 1..100")
        try:
            check_param_flags(args)
            args.params = generation_params(args)
            if args.params.get("output_format") != "latents":
                args.image_format = image_format(args.output)
        except OutputPathError as e:
            parser.error(f"-o/--output {e}")
        except (ValueError, TypeError) as e:
            parser.error(str(e))
    return args


def param_flag(name: str, args: argparse.Namespace | None = None) -> str:
    """The flag a user sets field `name` with (`--steps` for num_timesteps, `--size` when it set
    the height and width)."""
    if name in ("height", "width") and args is not None and args.size is not None:
        return "--size"
    extra = param_fields()[name].metadata["flags"]
    return extra[0] if extra else flag(name)


def check_param_flags(args: argparse.Namespace) -> None:
    """ValueError naming the flag of the first value the request schema refuses, before any
    call (the model's own size limits are checked once its GetModelInfo is known)."""
    for name, f in param_fields().items():
        meta = f.metadata
        value = meta["codec"].from_cli(args, name)
        if value is None or (name == "seed" and value == SERVER_PICKS_SEED):
            continue
        where = f"{param_flag(name, args)} {value if not isinstance(value, tuple) else ' '.join(map(str, value))}"
        if name == "seed" and not 0 <= value <= MAX_SEED:
            raise ValueError(f"{where}: must be -1 (the server picks) or in 0..{MAX_SEED}")
        if name in ("height", "width") and value <= 0:
            raise ValueError(f"{where}: must be a positive number of pixels")
        try:
            meta["codec"].check(name, value)
            if meta["bounds"] is not None and not meta["bounds"].contains(value):
                raise ValueError(f"must be in {meta['bounds']}")
            if name == "cfg_interval" and not value[0] <= value[1]:
                raise ValueError("must satisfy LO <= HI")
        except (ValueError, TypeError) as e:
            # The schema's message starts `name=value` ("... must", "...: both ends"): the flag
            # and its value stand in for it.
            message = str(e).removeprefix(f"{name}={value!r}").lstrip(": ")
            raise ValueError(f"{where}: {message}") from None


def check_size_flags(args: argparse.Namespace, info: ModelInfo) -> None:
    """ValueError naming --size/--width/--height when the model cannot draw that size."""
    step, largest = info.size_step, info.max_size
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is None or not step or not largest:
            continue
        if value % step or value > largest:
            raise ValueError(
                f"{param_flag(name, args)} {value}: must be a multiple of {step} and at most "
                f"{largest} for {info.model_name or 'this model'}"
            )


def add_param_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per request-schema field (`--cfg-text-scale`, ...), with its extra spellings
    (`--steps`, `--cfg-text`, ...), and `--think` with its sampling flags (`--think-top-p`, ...);
    every flag defaults to unset, i.e. the server's default, which its help states."""
    for name, f in param_fields().items():
        text = f.metadata["help"]
        if "unset:" not in text:  # else the help says already what unset means
            text = f"{text} (default: {default_text(name)})"
        meta = {**f.metadata, "help": text}
        f.metadata["codec"].add_argument(parser, name, meta)
    parser.add_argument(
        "--think",
        action="store_true",
        default=None,
        help="the model first writes a plan (printed), then draws from it (default: off)",
    )
    add_sampling_arguments(parser, THINK_PREFIX)


def default_text(name: str) -> str:
    """What an unset schema field becomes, as `--help` says it (argparse escapes: no %)."""
    if name in ("height", "width"):
        return "the model's native size; edit: the input's"
    value = param_fields()[name].default
    if name in EDIT_DEFAULTS:
        edit = EDIT_DEFAULTS[name]
        return f"{_shown(value)}; edit: {_shown(edit)}"
    if name == "num_timesteps":
        return f"the model's, {value} for BAGEL"
    return _shown(value) if value != "" else "none"


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def generation_params(args: argparse.Namespace) -> dict[str, Any]:
    """The `BagelClient.generate` keyword arguments the command line asks for (unset: None)."""
    values = {name: f.metadata["codec"].from_cli(args, name) for name, f in param_fields().items()}
    values["request_id"] = args.request_id
    values["think"] = args.think
    values.update(sampling_from_cli(args, THINK_PREFIX))
    return values


class ProgressDisplay:
    """Shows events as they come: on a TTY a tqdm bar, otherwise one plain line per step (logs and
    pipes get no carriage returns)."""

    def __init__(self, out: TextIO, tty: bool | None = None) -> None:
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self._bar: tqdm | None = None
        self._cached = 0
        self._thinking = False  # a plan is being printed

    def __call__(self, event: GenerateEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "accepted":
            a = event.accepted
            where = "running" if a.queue_position == 0 else f"queue position {a.queue_position}"
            self._line(f"accepted request {a.request_id} ({where})")
        elif kind == "thinking":
            if not self._thinking:
                self.out.write("plan: ")
                self._thinking = True
            self.out.write(event.thinking.text)
            self.out.flush()
        elif kind == "progress":
            if self._thinking:
                self.out.write("\n")
                self._thinking = False
            p = event.progress
            self._cached += int(p.cached)
            if not self.tty:
                self._line(f"step {p.step}/{p.total_steps}{' (cached)' if p.cached else ''}")
                return
            if self._bar is None:
                self._bar = tqdm(
                    total=p.total_steps, file=self.out, unit="step", desc="denoise", leave=True
                )
            self._bar.set_postfix_str(f"{self._cached} cached", refresh=False)
            self._bar.update(p.step - self._bar.n)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _line(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.out)
            return
        self.out.write(text + "\n")
        self.out.flush()


def timing_summary(timings: dict[str, float], wall_s: float) -> str:
    """Phases in the order the protocol lists them, then the client's own wall time."""
    order = [f.name for f in Timings.DESCRIPTOR.fields]
    lines = ["timings:"]
    for name in sorted(timings, key=lambda n: order.index(n) if n in order else len(order)):
        lines.append(f"  {name.removesuffix('_ms'):<10} {timings[name]:10.1f} ms")
    lines.append(f"  {'client':<10} {wall_s * 1000:10.1f} ms")
    return "\n".join(lines)


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def run_generate(args: argparse.Namespace) -> int:
    display = ProgressDisplay(sys.stderr)
    started = time.perf_counter()
    for flag_name, path in (("-o/--output", args.output), ("--summary-json", args.summary_json)):
        try:
            if path is not None:
                check_writable(path)
        except OutputPathError as e:
            _error(f"{flag_name}: {e}")
            return 2
    try:
        with connect(args) as client:
            if args.width is not None or args.height is not None:
                info = model_info_or_none(client)
                if info is not None:
                    check_size_flags(args, info)
            if args.command == "edit":
                image = args.input.read_bytes()
                result = client.edit(image, args.prompt, on_event=display, **args.params)
            else:
                result = client.generate(args.prompt, on_event=display, **args.params)
    except OSError as e:  # the input image cannot be read
        display.finish()
        _error(f"cannot read {args.input}: {e.strerror or e}")
        return 2
    except BagelError as e:
        display.finish()
        _error(str(e))
        return 1
    except SecurityError as e:
        display.finish()
        _error(str(e))
        return 2
    except (TypeError, ValueError) as e:  # a value the wire cannot carry (e.g. a negative size)
        display.finish()
        _error(f"INVALID_ARGUMENT: {e}")
        return 2
    except IncompleteGeneration as e:
        display.finish()
        _error(f"INTERNAL: {e}")
        return 1
    except KeyboardInterrupt:  # the `with` blocks have cancelled the call
        display.finish()
        _error("CANCELLED: interrupted")
        return 130
    display.finish()
    wall_s = time.perf_counter() - started
    try:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        if result.latents is not None:  # --output-format latents: a .npy file
            with args.output.open("wb") as f:
                np.save(f, result.latents)
        else:
            args.output.write_bytes(
                encode(result.png, result.image, args.image_format, args.quality)
            )
    except OSError as e:
        _error(f"cannot write {args.output}: {e}")
        return 1
    what = (
        f"latents {'x'.join(map(str, result.latents.shape))}"
        if result.latents is not None
        else f"{result.width}x{result.height}"
    )
    if result.thinking:
        print(f"plan: {result.thinking}")
    picked = " picked by the server" if args.params.get("seed") in (None, SERVER_PICKS_SEED) else ""
    print(f"wrote {args.output} ({what}, seed {result.seed}{picked}, request {result.request_id})")
    print(timing_summary(result.timings, wall_s))
    if args.summary_json is not None:
        try:
            write_summary(args.summary_json, result, wall_s)
        except OSError as e:
            _error(f"cannot write {args.summary_json}: {e}")
            return 1
    return 0


def write_summary(path: Path, result: GenerationResult, wall_s: float) -> None:
    summary = {
        "request_id": result.request_id,
        "seed": result.seed,
        "width": result.width,
        "height": result.height,
        "steps": result.steps,
        "cached_steps": result.cached_steps,
        "timings_ms": {**result.timings, "client_ms": wall_s * 1000},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")


def model_info_or_none(client: BagelClient) -> ModelInfo | None:
    """The server's ModelInfo, or None from a server without GetModelInfo."""
    try:
        return client.model_info()
    except Unimplemented:
        return None


def run_health(args: argparse.Namespace) -> int:
    if args.wait < 0:
        _error(f"--wait {args.wait}: must be at least 0")
        return 2
    deadline = time.monotonic() + args.wait
    try:
        with connect(args) as client:
            while True:
                try:
                    status = client.health()
                except (Unavailable, DeadlineExceeded):  # not listening yet, or busy starting
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(HEALTH_POLL_S)
                    continue  # asked again even if the wait ran out meanwhile: an answer to print
                if status == "SERVING" or time.monotonic() >= deadline:
                    break
                time.sleep(HEALTH_POLL_S)
    except BagelError as e:
        _error(str(e))
        return 1
    except SecurityError as e:
        _error(str(e))
        return 2
    print(status)
    return 0 if status == "SERVING" else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command in ("generate", "edit"):
        return run_generate(args)
    if args.command in ("understand", "chat"):
        return run_text(args, connect)
    return run_health(args)
