"""Runs `--help` of the named benchmarks in one process, each as `python -m benchmarks.NAME` or as
`python benchmarks/NAME.py` would run it: its own `sys.path[0]`, the repo's modules imported afresh
(torch and the other installed packages stay loaded, so torch is imported once for all of them).
Prints {name: [exit status, stdout, stderr]} as JSON.

Usage: python tests/benchmarks/help_in_one_process.py module|script NAME...
"""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import sys
import traceback
from pathlib import Path

import torch  # noqa: F401 - loaded once, kept across the runs

ROOT = Path(__file__).resolve().parents[2]


def forget_the_repos_modules() -> None:
    """Drop every module loaded from the repository, so that the next run imports it afresh."""
    installed = str(Path(sys.prefix).resolve())  # the virtualenv may sit inside the repository
    for key, module in list(sys.modules.items()):
        path = str(getattr(module, "__file__", None) or "")
        if key != "__main__" and path.startswith(str(ROOT)) and not path.startswith(installed):
            del sys.modules[key]


def help_of(form: str, name: str) -> list:
    forget_the_repos_modules()
    script = ROOT / "benchmarks" / f"{name}.py"
    # What Python puts first on sys.path: the working directory for -m, the script's folder else.
    sys.path[0] = str(ROOT) if form == "module" else str(script.parent)
    sys.argv = [str(script), "--help"]
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if form == "module":
                runpy.run_module(f"benchmarks.{name}", run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(str(script), run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:  # noqa: BLE001 - reported as the run's failure
            traceback.print_exc()
            code = 1
    return [code, out.getvalue(), err.getvalue()]


def main() -> None:
    form, names = sys.argv[1], sys.argv[2:]
    if form not in ("module", "script"):
        raise SystemExit(f"form must be module or script, not {form!r}")
    results = {name: help_of(form, name) for name in names}
    sys.stdout.write(json.dumps(results))


if __name__ == "__main__":
    main()
