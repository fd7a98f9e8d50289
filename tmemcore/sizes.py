"""Sizes on command lines: "4096", "512K", "64M", "1G", "1T" (binary units, optional "B"/"iB").

One parser for every tool (tmemd --memory, guestfs mount --page-cache/--tmem, guestfs lab and
demo sizes), so the same text means the same number of bytes everywhere.
"""

from __future__ import annotations

import re

from .abi import PAGE_SIZE

MAX_SIZE = 1 << 40  # 1 TiB: far beyond any cache here; a larger size is a typo
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes; ValueError (one line) for anything else or for more than 1 TiB."""
    match = _SIZE_RE.match(text)
    if match is None:
        raise ValueError(f"invalid size {text!r}: expected a number of bytes with an optional K/M/G/T suffix")
    number, unit, _ = match.groups()
    size = int(number) * _UNITS[unit.lower()]
    if size > MAX_SIZE:
        raise ValueError(f"size {text!r} is larger than the 1 TiB limit")
    return size


def size_to_pages(nbytes: int) -> int:
    """Bytes -> 4 KiB pages, rounding up in integers (a budget of 1 byte still holds one page)."""
    return -(-nbytes // PAGE_SIZE)
