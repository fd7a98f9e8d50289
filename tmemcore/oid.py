"""Object ids: 192-bit values made of three u64 words (tmem ABI v1).

Xen compares oids word 2 first, then word 1, then word 0 (``oid_compare`` in tmem.c 4.1).
That is exactly the numeric order of ``w0 | w1 << 64 | w2 << 128``, so an ``Oid`` *is* that
integer: ordering, hashing and equality come from ``int`` and cannot disagree with Xen.
A v0 oid (one u64) is the v1 oid ``(oid, 0, 0)``. All three words all-ones is the invalid
oid, used as the save-stream terminator.
"""

from __future__ import annotations

from .errors import InvalidArgument

WORD_MASK = (1 << 64) - 1
OID_BITS = 192
OID_MAX = (1 << OID_BITS) - 1
V0_OID_MAX = WORD_MASK


class Oid(int):
    """A 192-bit tmem object id; ``Oid(n)`` for 0 <= n < 2**192."""

    __slots__ = ()

    def __new__(cls, value: int = 0) -> "Oid":
        if not 0 <= value <= OID_MAX:
            raise InvalidArgument(f"oid {value:#x} does not fit in 192 bits")
        return super().__new__(cls, value)

    @classmethod
    def from_words(cls, w0: int, w1: int = 0, w2: int = 0) -> "Oid":
        for word in (w0, w1, w2):
            if not 0 <= word <= WORD_MASK:
                raise InvalidArgument(f"oid word {word:#x} does not fit in 64 bits")
        return cls(w0 | w1 << 64 | w2 << 128)

    @classmethod
    def from_bytes24(cls, raw: bytes) -> "Oid":
        """Three little-endian u64 words, as Linux's 24-byte cleancache_filekey is read."""
        if len(raw) != 24:
            raise InvalidArgument(f"an oid is 24 bytes, got {len(raw)}")
        return cls(int.from_bytes(raw, "little"))

    @property
    def words(self) -> tuple[int, int, int]:
        v = int(self)
        return v & WORD_MASK, (v >> 64) & WORD_MASK, v >> 128

    def to_bytes24(self) -> bytes:
        return int(self).to_bytes(24, "little")

    @property
    def fits_v0(self) -> bool:
        """True when words 1 and 2 are zero, so a v0 (64-bit) guest can name this object."""
        return int(self) <= V0_OID_MAX

    @property
    def is_invalid(self) -> bool:
        return int(self) == OID_MAX

    def __repr__(self) -> str:
        w0, w1, w2 = self.words
        return f"Oid({w0:#x}, {w1:#x}, {w2:#x})"

    __str__ = __repr__


INVALID_OID = Oid(OID_MAX)
