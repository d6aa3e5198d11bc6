"""CRC-32C (Castagnoli) of chunks and of the whole payload, without reading any byte twice.

`google_crc32c` checksums bytes at memory speed; `combine` joins the CRCs of adjacent pieces in
GF(2) arithmetic (the zlib `crc32_combine` method), so the payload digest comes from the chunk CRCs
and a frame's data CRC comes from the CRC of the whole frame.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

import google_crc32c

_POLY = 0x82F63B78  # CRC-32C, bit-reflected


def crc32c(data: bytes) -> int:
    """CRC-32C of a bytes-like object that exposes a plain buffer (bytes, a numpy array)."""
    return google_crc32c.value(data)


def _multiply(a: int, b: int) -> int:
    """Product of two polynomials modulo the CRC polynomial (bit-reflected)."""
    product = 0
    m = 1 << 31
    while m:
        if a & m:
            product ^= b
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
        m >>= 1
    return product


def _x_power_2k_table() -> list[int]:
    """x^(2^k) mod P for k in 0..63, so x^n mod P takes one product per set bit of n."""
    table = [1 << 30]  # the polynomial x
    for _ in range(63):
        table.append(_multiply(table[-1], table[-1]))
    return table


_X_POW_2K = _x_power_2k_table()


@lru_cache(maxsize=256)
def _shift_operator(nbytes: int) -> int:
    """x^(8 * nbytes) mod P: appending nbytes zero bytes multiplies a CRC by this."""
    power = 1 << 31  # the polynomial 1
    n, k = nbytes, 3  # 8 * nbytes = nbytes << 3
    while n:
        if n & 1:
            power = _multiply(_X_POW_2K[k], power)
        n >>= 1
        k += 1
    return power


def combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """CRC-32C of A + B from the CRC of A, the CRC of B and the length of B."""
    return _multiply(_shift_operator(len_b), crc_a) ^ crc_b


def crc32c_of_tail(crc_whole: int, crc_head: int, len_tail: int) -> int:
    """CRC-32C of B from the CRC of A + B, the CRC of A and the length of B."""
    return _multiply(_shift_operator(len_tail), crc_head) ^ crc_whole


def combine_all(pieces: Iterable[tuple[int, int]]) -> int:
    """CRC-32C of the concatenation of pieces given as (crc, length), in order."""
    total = 0  # the CRC of no bytes
    for crc, length in pieces:
        total = combine(total, crc, length)
    return total
