"""`python -m gateway.health_check HOST:PORT`: print the gateway's readiness (GET /ready) and exit
0 iff it is ready, for container health checks (the image has no curl)."""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

TIMEOUT_S = 4.0


def ready(address: str, timeout: float = TIMEOUT_S) -> tuple[bool, str]:
    """(ready, what /ready said or why it could not be asked)."""
    try:
        with urllib.request.urlopen(f"http://{address}/ready", timeout=timeout) as reply:
            return reply.status == 200, reply.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return False, e.read().decode(errors="replace")
    except OSError as e:
        return False, f"cannot reach http://{address}/ready: {e}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m gateway.health_check HOST:PORT", file=sys.stderr)
        return 2
    ok, said = ready(args[0])
    print(said)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
