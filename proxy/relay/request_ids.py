"""Request ids: UUIDv7, generated on the request path of every logged call."""

from __future__ import annotations

import os
import time


def new_request_id() -> str:
    """A UUIDv7 (RFC 9562): millisecond time first, then 74 random bits. Time-ordered ids are appended
    at the end of the unique index instead of landing at random places in it, which keeps inserts into
    a large ledger fast, and they sort in arrival order. Built from hex digits, with the time part
    formatted once per millisecond: integer arithmetic on every call costs more."""
    global _stamp
    millisecond = time.time_ns() // 1_000_000
    if millisecond != _stamp[0]:
        hex_time = f"{millisecond & MASK_48:012x}"
        _stamp = (millisecond, f"{hex_time[:8]}-{hex_time[8:]}-7")  # 7: the version
    digits = _random_hex(19)
    # the RFC variant: the two high bits of the 17th digit are 10 (8, 9, a or b)
    return f"{_stamp[1]}{digits[:3]}-{VARIANT_DIGIT[digits[3]]}{digits[4:7]}-{digits[7:]}"


_stamp = (-1, "")  # (millisecond, the id's first 15 characters in it)
MASK_48 = (1 << 48) - 1
VARIANT_DIGIT = dict(zip("0123456789abcdef", "89ab89ab89ab89ab", strict=True))
_POOL_BYTES = 4096
_hex_pool = ""
_hex_at = 0


def _random_hex(count: int) -> str:
    """Random hex digits from os.urandom, read 4 KiB at a time: one getrandom() per ~430 ids."""
    global _hex_pool, _hex_at
    start = _hex_at
    if start + count > len(_hex_pool):
        _hex_pool, start = os.urandom(_POOL_BYTES).hex(), 0
    _hex_at = start + count
    return _hex_pool[start : start + count]


def _forget_random_pool() -> None:
    """A forked child must not hand out the digits its parent has already used."""
    global _hex_pool, _hex_at
    _hex_pool, _hex_at = "", 0


os.register_at_fork(after_in_child=_forget_random_pool)
