"""The README's commands work as written on a fresh checkout: every code block whose info string
is `sh run` is read from README.md (never copied here) and run, in order, as one bash script with
`set -euo pipefail`, in a copy of the repository's files with the test's virtualenv as `.venv`.

The convention for a new block: write it as "```sh run" and it is covered; a command ending in
`&` is a service, stopped (SIGTERM) when the script ends; `client health --wait` waits for one.
Each 127.0.0.1:PORT is moved to a free port, so a service already on the documented one cannot
clash. Then every file a `-o` wrote must exist, and each image drawn or edited with a fixed seed
must show what its prompt asks (`examples/tiny_shapes/check.py`: `check_image`, `check_edit`).

Blocks that are plain "```sh" are not run: `make` (it installs), the test and benchmark commands,
torchrun.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from examples.tiny_shapes.check import check_edit, check_image, describe
from examples.tiny_shapes.data import COLOURS, SHAPES
from tests.helpers.ranks import free_port

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.M | re.S)
ADDRESS = re.compile(r"127\.0\.0\.1:(\d+)")
SCRIPT_TIMEOUT_S = 900
CAPTION = re.compile(
    rf"\ba (?P<colour>{'|'.join(COLOURS)}) (?P<shape>{'|'.join(SHAPES)})"
    r"(?:,? (?:on )?a? ?(?P<background>white|black) background)?"
)


def run_blocks(markdown: str) -> list[str]:
    """The bodies of the `sh run` blocks, in order."""
    return [body for info, body in FENCE.findall(markdown) if info.split() == ["sh", "run"]]


def commands(blocks: list[str]) -> list[list[str]]:
    """Each command line of the blocks as shell words (comments and blank lines left out)."""
    lines = "\n".join(blocks).splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip()[:1] not in ("", "#")]


@dataclass(frozen=True)
class Output:
    """A file a `-o` wrote; `prompt` is what a seeded command asked for (a server-picked seed
    may draw the rare miss: not judged), `source` the input image of an edit."""

    path: str
    prompt: str | None = None
    source: str | None = None


def outputs(blocks: list[str]) -> list[Output]:
    found = []
    for words in commands(blocks):
        if "-o" not in words:
            continue
        path = words[words.index("-o") + 1]
        seeded = "--seed" in words and words[words.index("--seed") + 1] != "-1"
        if seeded and "generate" in words:
            found.append(Output(path, words[words.index("generate") + 1]))
        elif seeded and "edit" in words:
            at = words.index("edit")
            found.append(Output(path, words[at + 2], source=words[at + 1]))
        else:
            found.append(Output(path))
    return found


def fresh_checkout(target: Path) -> Path:
    """The repository's files (tracked and new, not ignored) copied to `target`, with this
    test's virtualenv as `.venv`, as a fresh clone after `make` would be."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        source = ROOT / name
        if not source.is_file():  # deleted in the worktree but still in the index
            continue
        dest = target / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(source.read_bytes())
    venv_bin = target / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    for name in ("python", "pip"):
        wrapper = venv_bin / name
        real = Path(sys.executable).with_name(name)
        wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(str(real))} "$@"\n')
        wrapper.chmod(0o755)
    return target


def with_free_ports(script: str) -> str:
    ports = {port: str(free_port()) for port in sorted(set(ADDRESS.findall(script)))}
    return ADDRESS.sub(lambda m: f"127.0.0.1:{ports[m.group(1)]}", script)


def as_script(blocks: list[str]) -> str:
    """One bash script: the blocks in order; background services stopped however it ends."""
    return "\n".join(
        [
            "set -euo pipefail",
            "stop() { for pid in $(jobs -p); do kill -TERM $pid 2>/dev/null || true; done; wait; }",
            "trap stop EXIT",
            "set -x",
            *blocks,
        ]
    )


def test_the_readme_has_the_services_block_and_it_uses_the_trained_checkpoint():
    blocks = run_blocks(README.read_text())
    starts = {words[2] for words in commands(blocks) if words[1:2] == ["-m"]}
    assert {"diffusion_service", "prefill_service", "client"} <= starts
    for words in commands(blocks):
        if "--model" in words:
            assert words[words.index("--model") + 1] == "examples/tiny_shapes/checkpoint"
    # The parsing above bites: a block tagged otherwise is not picked up.
    assert run_blocks("```sh\necho no\n```\n```sh run\necho yes\n```\n") == ["echo yes\n"]


@pytest.mark.slow
def test_the_readme_commands_work_as_written(tmp_path: Path):
    blocks = run_blocks(README.read_text())
    checkout = fresh_checkout(tmp_path / "checkout")
    script = with_free_ports(as_script(blocks))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        ["bash", "-c", script],
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
        env={**env, "PYTHONUNBUFFERED": "1"},
    )
    log = done.stdout[-6000:] + done.stderr[-6000:]
    assert done.returncode == 0, log
    assert "Traceback" not in done.stderr, log
    written = outputs(blocks)
    assert written, "the README writes no file"
    for out in written:
        assert (checkout / out.path).is_file(), f"{out.path} was not written:\n{log}"
        if out.prompt is None:
            continue
        with Image.open(checkout / out.path) as image:
            assert image.size == (128, 128)  # the model's native size (an edit: its input's)
            drawn = image.convert("RGB")
        if out.source is None:
            match = CAPTION.search(out.prompt)
            assert match, f"{out.prompt!r} is not a prompt of the trained checkpoint"
            verdict = check_image(drawn, match["colour"], match["background"])
        else:
            with Image.open(checkout / out.source) as source:
                spec = describe(source.convert("RGB"))
            assert spec is not None, f"{out.source} shows no shape"
            verdict = check_edit(drawn, out.prompt, spec)
        assert verdict.passed, (out, verdict)


def test_only_seeded_generations_and_edits_are_judged():
    block = (
        '.venv/bin/python -m client generate "a red circle" -o a.png --seed 3\n'
        '.venv/bin/python -m client generate "a red circle" -o b.png --seed -1\n'
        '.venv/bin/python -m client edit a.png "make it blue" -o c.png --seed 3  # an edit\n'
        '.venv/bin/python -m client edit a.png "make it blue" -o d.png\n'
    )
    assert outputs([block]) == [
        Output("a.png", "a red circle"),
        Output("b.png"),
        Output("c.png", "make it blue", source="a.png"),
        Output("d.png"),
    ]
