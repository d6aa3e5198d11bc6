"""Request ids (checked alike in both services) and log-safe client strings."""

from __future__ import annotations

import pytest

from serving.errors import InvalidParams
from serving.service.requests import MAX_REQUEST_ID_CHARS, check_request_id, loggable


@pytest.mark.parametrize("rid", ["req-1", "a b/c:d_e.f", "x" * MAX_REQUEST_ID_CHARS, "~!"])
def test_a_printable_ascii_id_up_to_the_limit_passes_unchanged(rid):
    assert check_request_id(rid) == rid


def test_an_empty_id_is_replaced_by_a_new_one():
    first, second = check_request_id(""), check_request_id("")
    assert len(first) == 16 and first != second


@pytest.mark.parametrize(
    ("rid", "fragment"),
    [
        ("bad\nid", "got 6 characters, some not printable ASCII"),
        ("tab\there", "got 8 characters, some not printable ASCII"),
        ("caf\u00e9", "got 4 characters, some not printable ASCII"),
        ("x" * (MAX_REQUEST_ID_CHARS + 1), f"got {MAX_REQUEST_ID_CHARS + 1} characters"),
        ("forged\n2026-01-01 INFO ok" * 4000, "got 100000 characters, some not printable"),
    ],
)
def test_a_bad_id_is_invalid_params_and_the_message_does_not_repeat_it(rid, fragment):
    with pytest.raises(InvalidParams) as info:
        check_request_id(rid)
    message = str(info.value)
    assert message.startswith("request_id must be 1 to 128 printable ASCII characters")
    assert fragment in message
    assert rid not in message and len(message) < 200


def test_loggable_escapes_control_and_non_ascii_characters():
    assert loggable("a\nb\r\x1b[31mc\u00e9\u202e") == "a\\nb\\r\\x1b[31mc\\xe9\\u202e"
    assert "\n" not in loggable("line\nforged")


def test_loggable_cuts_long_text_and_says_how_much_is_left_out():
    assert loggable("x" * 100, limit=10) == "xxxxxxxxxx...(+90 chars)"
    assert loggable("\n" * 100, limit=10) == "\\n" * 5 + "...(+190 chars)"
    assert loggable("req-1") == "req-1"


def test_a_long_printable_id_is_refused_for_its_length_alone():
    with pytest.raises(InvalidParams) as info:
        check_request_id("x" * 129)
    assert str(info.value) == (
        "request_id must be 1 to 128 printable ASCII characters; got 129 characters"
    )


def test_loggable_keeps_64_characters_by_default_and_a_backslash_as_it_is():
    assert loggable("x" * 64) == "x" * 64
    assert loggable("x" * 65) == "x" * 64 + "...(+1 chars)"
    assert loggable("y" * 10, limit=10) == "y" * 10
    assert loggable("a\\b\x00") == "a\\b\\x00"
