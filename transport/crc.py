"""CRC-32C (Castagnoli) of chunks and of the whole payload, without reading any byte twice.

`google_crc32c` checksums bytes at memory speed; `combine` joins the CRCs of adjacent pieces in
GF(2) arithmetic (the zlib `crc32_combine` method), so the payload digest comes from the chunk CRCs
without a second pass over the payload. `combine_all` multiplies by the shift
of a length that recurs (the chunk size) through byte tables: four look-ups instead of a 32-step
loop, which matters at hundreds of chunks per request.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from functools import lru_cache

import google_crc32c

_POLY = 0x82F63B78  # CRC-32C, bit-reflected


def crc32c(data: bytes) -> int:
    """CRC-32C of a bytes-like object that exposes a plain buffer (bytes, a numpy array)."""
    return google_crc32c.value(data)


def extend(crc: int, data: bytes) -> int:
    """CRC-32C of the bytes the CRC `crc` covers followed by `data` (`crc32c(b) == extend(0, b)`)."""
    return google_crc32c.extend(crc, data)


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


# A length must recur this often in one `combine_all` before its tables (costly to build) pay.
_TABLE_AFTER = 16


@lru_cache(maxsize=64)
def _shift_tables(nbytes: int) -> tuple[tuple[int, ...], ...]:
    """Byte tables of "multiply by x^(8 * nbytes) mod P": the product is linear in the other
    factor, so it is the XOR of one entry per byte of it."""
    operator = _shift_operator(nbytes)
    tables = []
    for byte in range(4):
        basis = [_multiply(operator, 1 << (8 * byte + bit)) for bit in range(8)]
        table = [0] * 256
        for value in range(1, 256):
            low = value & -value
            table[value] = table[value ^ low] ^ basis[low.bit_length() - 1]
        tables.append(tuple(table))
    return tuple(tables)


def combine_all(pieces: Iterable[tuple[int, int]]) -> int:
    """CRC-32C of the concatenation of pieces given as (crc, length), in order."""
    pieces = list(pieces)
    counts = Counter(length for _, length in pieces)
    tables = {n: _shift_tables(n) for n, count in counts.items() if count >= _TABLE_AFTER}
    total = 0  # the CRC of no bytes
    for crc, length in pieces:
        t = tables.get(length)
        if t is None:
            total = combine(total, crc, length)
        else:
            t0, t1, t2, t3 = t
            total = (
                t0[total & 0xFF]
                ^ t1[(total >> 8) & 0xFF]
                ^ t2[(total >> 16) & 0xFF]
                ^ t3[total >> 24]
                ^ crc
            )
    return total
