"""The README's gateway quick start, run as written against the real services: its code blocks
are read from README.md (the `sh` block's `curl` and the `python` block); only the addresses
become this test's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gateway.conftest import decoded
from tests.helpers.processes import ROOT

SECTION = "### Over HTTP: the OpenAI-compatible gateway"
README_GATEWAY = "127.0.0.1:8000"
README_PREFILL = "127.0.0.1:50051"


def quick_start() -> tuple[str, str]:
    """The section's `sh` and `python` code blocks."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(SECTION) :]
    section = section[: section.index("\n#", len(SECTION))]
    blocks = dict(re.findall(r"```(sh|python)\n(.*?)```", section, flags=re.S))
    return blocks["sh"], blocks["python"]


def test_the_readme_starts_the_gateway_in_front_of_its_prefill_service():
    shell, _ = quick_start()
    start = shell.splitlines()[0]
    assert start.startswith(".venv/bin/python -m gateway ")
    assert f"--listen {README_GATEWAY}" in start and f"--prefill {README_PREFILL}" in start


@pytest.mark.slow  # the README's commands, with a gateway and both services: ~20 s
def test_the_readmes_curl_and_openai_examples_draw_the_same_image(gateway, tmp_path: Path):
    shell, python = quick_start()
    curl = "\n".join(shell.splitlines()[1:]).replace(README_GATEWAY, gateway.address)
    run = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", curl], cwd=tmp_path, capture_output=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    sdk = subprocess.run(
        [sys.executable, "-c", python.replace(README_GATEWAY, gateway.address)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sdk.returncode == 0, sdk.stderr
    assert "'seed': 7" in sdk.stdout
    by_curl = (tmp_path / "circle.png").read_bytes()
    by_sdk = (tmp_path / "circle-sdk.png").read_bytes()
    assert by_curl == by_sdk
    import base64

    assert decoded(base64.b64encode(by_curl).decode()).size == (128, 128)
