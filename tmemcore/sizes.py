"""Sizes and durations on command lines.

Sizes: "4096", "512K", "64M", "1G", "1T" (binary units, optional "B"/"iB"); durations: finite
seconds. One parser each for every tool (tmemd --memory, tmemctl --timeout, guestfs mount
--page-cache/--tmem/--attr-timeout/--timeout and -o timeouts, guestfs lab and demo sizes), so the
same text means the same thing everywhere.
"""

from __future__ import annotations

import math
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


def parse_seconds(text: str, what: str, *, allow_zero: bool, maximum: float = math.inf) -> float:
    """A finite, non-negative (or with ``allow_zero=False`` positive) number of seconds, at most ``maximum``."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what} must be a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero) or value > maximum:
        bound = ">= 0" if allow_zero else "> 0"
        bound += f" and <= {maximum:g}" if maximum < math.inf else ""
        raise ValueError(f"{what} must be a finite number of seconds {bound}, got {text!r}")
    return value
