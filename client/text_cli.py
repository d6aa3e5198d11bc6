"""`python -m client understand IMAGE QUESTION` and `python -m client chat MESSAGE`: the answer
printed as it is decoded, then a line with the finish reason, usage and timings (on stderr)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import grpc

from client.client import BagelClient
from client.text import IncompleteAnswer
from serving.service.security import SecurityError
from serving.text_params import add_sampling_arguments, sampling_from_cli


def add_text_commands(
    commands: argparse._SubParsersAction,
    add_connection_args: Callable[[argparse.ArgumentParser], None],
) -> None:
    understand = commands.add_parser(
        "understand", help="ask about an image (PNG or JPEG); prints the answer as it comes"
    )
    understand.add_argument("image", type=Path, help="the image (PNG or JPEG)")
    understand.add_argument("question")
    chat = commands.add_parser("chat", help="send a message; prints the answer as it comes")
    chat.add_argument("message")
    chat.add_argument("--system", help="a system message before it")
    for parser in (understand, chat):
        parser.add_argument(
            "--think", action="store_true", help="reason in <think>...</think> before answering"
        )
        parser.add_argument("--request-id", help="unset: the server assigns one")
        add_sampling_arguments(parser)
        add_connection_args(parser)


def run_text(args: argparse.Namespace, connect: Callable[[argparse.Namespace], BagelClient]) -> int:
    params = {**sampling_from_cli(args), "think": args.think, "request_id": args.request_id}

    def show(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    try:
        with connect(args) as client:
            if args.command == "understand":
                image = args.image.read_bytes()
                result = client.understand(image, args.question, on_text=show, **params)
            else:
                messages = [("system", args.system)] if args.system else []
                messages.append(("user", args.message))
                result = client.chat(messages, on_text=show, **params)
    except OSError as e:
        print(f"error: cannot read {args.image}: {e.strerror or e}", file=sys.stderr)
        return 2
    except grpc.RpcError as e:
        print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except SecurityError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TypeError, ValueError) as e:
        print(f"error: INVALID_ARGUMENT: {e}", file=sys.stderr)
        return 2
    except IncompleteAnswer as e:
        print(f"\nerror: INTERNAL: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nerror: CANCELLED: interrupted", file=sys.stderr)
        return 130
    print()
    t = result.timings
    print(
        f"[{result.finish_reason}; {result.prompt_tokens} prompt + {result.completion_tokens} "
        f"completion tokens; prefill {t['prefill_ms']:.1f} ms, decode {t['decode_ms']:.1f} ms, "
        f"total {t['total_ms']:.1f} ms; request {result.request_id}]",
        file=sys.stderr,
    )
    return 0
