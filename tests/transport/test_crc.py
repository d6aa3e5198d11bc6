"""CRC-32C combination: the payload digest and a frame's data CRC without a second pass."""

from __future__ import annotations

import google_crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from transport.crc import (
    _multiply,
    _x_power_2k_table,
    combine,
    combine_all,
    crc32c,
)

pieces = st.binary(max_size=3000)


def test_crc32c_is_castagnoli():
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value


@settings(max_examples=200, deadline=None)
@given(pieces, pieces)
def test_combine_equals_the_crc_of_the_concatenation(a, b):
    assert combine(crc32c(a), crc32c(b), len(b)) == google_crc32c.value(a + b)


@settings(max_examples=100, deadline=None)
@given(st.lists(pieces, max_size=12))
def test_combine_all_equals_the_crc_of_everything(parts):
    assert combine_all((crc32c(p), len(p)) for p in parts) == google_crc32c.value(b"".join(parts))


def test_combine_handles_lengths_beyond_a_gigabyte():
    # x^(8n) for n = 2**31 + 5 exercises the high bits of the power table
    assert combine(0xDEADBEEF, 0, 2**31 + 5) == combine(combine(0xDEADBEEF, 0, 2**31), 0, 5)


def test_combine_all_with_a_recurring_length_equals_the_crc_of_everything():
    # Enough pieces of one length that combine_all takes its table path for them.
    parts = [bytes([i]) * 1000 for i in range(40)] + [b"tail", b""] + [b"x" * 1000] * 20
    assert combine_all((crc32c(p), len(p)) for p in parts) == google_crc32c.value(b"".join(parts))


def test_the_power_table_holds_x_to_the_2_to_the_k_for_64_values_of_k():
    """x, x^2, x^4, x^8, x^16 have no reduction (bit 31 - degree, bit-reflected); each later entry
    is the square of the one before, and entry k shifts a CRC by 2^k bits (2^(k-3) zero bytes)."""
    table = _x_power_2k_table()
    assert len(table) == 64
    assert table[:5] == [1 << 30, 1 << 29, 1 << 27, 1 << 23, 1 << 15]
    for k in range(3, 12):
        zeros = bytes(2 ** (k - 3))
        assert combine(0x12345678, crc32c(zeros), len(zeros)) == google_crc32c.extend(
            0x12345678, zeros
        )
        assert table[k + 1] == _multiply(table[k], table[k])
