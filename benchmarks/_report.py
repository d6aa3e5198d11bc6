"""How a benchmark hands over its results: one JSON object as its last line of output, and the
same object, indented, in a file when `--json PATH` asks for one."""

from __future__ import annotations

import json
from pathlib import Path


def emit_json(summary: dict, path: str | Path | None = None) -> None:
    if path:
        Path(path).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
