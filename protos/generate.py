"""Regenerate the Python stubs in `protos/bagel/v1/` from the `.proto` files next to them.

Run `python protos/generate.py` after editing a `.proto`; the stubs are checked in and a test fails
when they are stale. Imports between stubs are rewritten to package-relative ones, because the
top-level `bagel` package is the model, not these stubs.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PACKAGE_DIR = Path("bagel") / "v1"
_CROSS_IMPORT = re.compile(r"^from bagel\.v1 import (\w+_pb2)", re.MULTILINE)


def proto_files() -> list[Path]:
    """The `.proto` sources, relative to the include root `protos/`."""
    return sorted(p.relative_to(PROTO_ROOT) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))


def _has_service(proto: Path) -> bool:
    return re.search(r"^service ", (PROTO_ROOT / proto).read_text(), re.MULTILINE) is not None


def generate(out_root: Path) -> list[Path]:
    """Write `*_pb2.py` and `*_pb2_grpc.py` under `out_root/bagel/v1`; return them."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    include = Path(protoc.__file__).parent / "_proto"
    sources = proto_files()
    base = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}"]
    runs = [
        [*base, f"--python_out={out_root}", *map(str, sources)],
        # Only files that declare services get a *_pb2_grpc.py; the others would be empty.
        [*base, f"--grpc_python_out={out_root}", *(str(p) for p in sources if _has_service(p))],
    ]
    for args in runs:
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed: " + " ".join(args))
    written = sorted((out_root / PACKAGE_DIR).glob("*_pb2*.py"))
    for path in written:
        text = path.read_text()
        path.write_text(_CROSS_IMPORT.sub(r"from . import \1", text))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="root to write bagel/v1 under")
    out_root = parser.parse_args(argv).out
    with tempfile.TemporaryDirectory() as tmp:
        # Generate aside first so a protoc failure never leaves half-written stubs behind.
        fresh = generate(Path(tmp))
        target = out_root / PACKAGE_DIR
        target.mkdir(parents=True, exist_ok=True)
        for path in fresh:
            (target / path.name).write_bytes(path.read_bytes())
            print(target / path.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
