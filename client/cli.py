"""`python -m client`: generate an image through a BAGEL prefill service (with a progress bar and a
timing summary), or ask a service for its health."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import grpc

from client.client import BagelClient, IncompleteGeneration
from protos import GenerateEvent, Timings

DEFAULT_SERVER = "127.0.0.1:50051"
BAR_WIDTH = 30


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m client",
        description="Generate images through a BAGEL prefill service, or check a service's health.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="text to image; writes a PNG")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", required=True, type=Path, help="PNG file to write")
    gen.add_argument("--size", type=int, help="square image side in pixels (multiple of 16)")
    gen.add_argument("--width", type=int, help="pixels (multiple of 16)")
    gen.add_argument("--height", type=int, help="pixels (multiple of 16)")
    gen.add_argument("--steps", type=int, help="number of timesteps (server default: 50)")
    gen.add_argument("--seed", type=int, help="unset: the server picks one and reports it")
    gen.add_argument("--cfg-text", type=float, help="text CFG scale (server default: 4.0)")
    gen.add_argument("--cfg-img", type=float, help="image CFG scale (server default: 1.5)")
    gen.add_argument("--cfg-interval", type=float, nargs=2, metavar=("LO", "HI"))
    gen.add_argument("--cfg-renorm-type", choices=("global", "channel", "text_channel"))
    gen.add_argument("--cfg-renorm-min", type=float)
    gen.add_argument("--timestep-shift", type=float)
    gen.add_argument("--negative", help="negative prompt (the unconditional text context)")
    gen.add_argument("--request-id", help="unset: the server assigns one")
    _add_connection_args(gen)

    health = commands.add_parser("health", help="print the server's health; exit 0 iff SERVING")
    _add_connection_args(health)
    return parser


def _add_connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=DEFAULT_SERVER, help=f"HOST:PORT ({DEFAULT_SERVER})")
    parser.add_argument("--timeout", type=float, help="deadline of the call in seconds")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate" and args.size is not None:
        if args.width is not None or args.height is not None:
            parser.error("--size cannot be combined with --width/--height")
        args.width = args.height = args.size
    return args


def generation_params(args: argparse.Namespace) -> dict[str, Any]:
    """The `BagelClient.generate` keyword arguments the command line asks for (unset: None)."""
    return {
        "height": args.height,
        "width": args.width,
        "num_timesteps": args.steps,
        "seed": args.seed,
        "cfg_text_scale": args.cfg_text,
        "cfg_img_scale": args.cfg_img,
        "cfg_interval": tuple(args.cfg_interval) if args.cfg_interval else None,
        "cfg_renorm_type": args.cfg_renorm_type,
        "cfg_renorm_min": args.cfg_renorm_min,
        "timestep_shift": args.timestep_shift,
        "negative_prompt": args.negative,
        "request_id": args.request_id,
    }


class ProgressDisplay:
    """Shows events as they come: on a TTY one updating bar, otherwise one line per step."""

    def __init__(self, out: TextIO, tty: bool | None = None) -> None:
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self.started = time.perf_counter()
        self._bar_open = False

    def __call__(self, event: GenerateEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "accepted":
            a = event.accepted
            where = "running" if a.queue_position == 0 else f"queue position {a.queue_position}"
            self._line(f"accepted request {a.request_id} ({where})")
        elif kind == "progress":
            p = event.progress
            cached = " (cached)" if p.cached else ""
            if self.tty:
                done = BAR_WIDTH * p.step // max(p.total_steps, 1)
                bar = "#" * done + "." * (BAR_WIDTH - done)
                elapsed = time.perf_counter() - self.started
                text = f"\r[{bar}] step {p.step}/{p.total_steps}{cached} {elapsed:6.1f} s"
                self.out.write(text)
                self._bar_open = True
                self.out.flush()
            else:
                self._line(f"step {p.step}/{p.total_steps}{cached}")

    def finish(self) -> None:
        if self._bar_open:
            self.out.write("\n")
            self.out.flush()
            self._bar_open = False

    def _line(self, text: str) -> None:
        self.finish()
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
    try:
        with BagelClient(args.server, timeout=args.timeout) as client:
            result = client.generate(args.prompt, on_event=display, **generation_params(args))
    except grpc.RpcError as e:
        display.finish()
        _error(f"{e.code().name}: {e.details()}")
        return 1
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
        args.output.write_bytes(result.png)
    except OSError as e:
        _error(f"cannot write {args.output}: {e}")
        return 1
    print(
        f"wrote {args.output} ({result.width}x{result.height}, seed {result.seed}, "
        f"request {result.request_id})"
    )
    print(timing_summary(result.timings, wall_s))
    return 0


def run_health(args: argparse.Namespace) -> int:
    try:
        with BagelClient(args.server, timeout=args.timeout) as client:
            status = client.health()
    except grpc.RpcError as e:
        _error(f"{e.code().name}: {e.details()}")
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "generate":
        return run_generate(args)
    return run_health(args)
