"""Request ids, checked the same way by both services, and client strings made safe for a log
line (escaped, bounded)."""

from __future__ import annotations

import uuid

from serving.errors import InvalidParams

MAX_REQUEST_ID_CHARS = 128
_PRINTABLE_ASCII = frozenset(chr(c) for c in range(0x20, 0x7F))


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def check_request_id(text: str) -> str:
    """`text` if it is a valid request id (1 to 128 printable ASCII characters), a new id if it
    is empty; InvalidParams otherwise. The message never repeats the id: it may be anything."""
    if not text:
        return new_request_id()
    if len(text) > MAX_REQUEST_ID_CHARS or not _PRINTABLE_ASCII.issuperset(text):
        raise InvalidParams(
            f"request_id must be 1 to {MAX_REQUEST_ID_CHARS} printable ASCII characters; "
            f"got {len(text)} characters"
            + ("" if _PRINTABLE_ASCII.issuperset(text) else ", some not printable ASCII")
        )
    return text


def loggable(text: str, limit: int = 64) -> str:
    """`text` as it may appear in a log line: non-printable and non-ASCII characters escaped the
    way `repr` escapes them (no quotes added), cut to `limit` characters with the count left out
    said. A valid request id of at most `limit` characters comes back unchanged."""
    escaped = text if _PRINTABLE_ASCII.issuperset(text) else _escape(text)
    if len(escaped) <= limit:
        return escaped
    return f"{escaped[:limit]}...(+{len(escaped) - limit} chars)"


def _escape(text: str) -> str:
    return "".join(c if c in _PRINTABLE_ASCII else ascii(c)[1:-1] for c in text)
