"""Where a page's bytes live: the page descriptor ("pgp") and its stored forms.

A page descriptor is a 4-slot list, not an object, because there is one per stored page
and a list literal is the cheapest container Python builds (see docs/tmemcore.md,
"memory per page")::

    node = [stored, pool, oid, index]        # DATA, POOL, OID, INDEX
    not node                                 # the descriptor is dead: cleared when its page went

The same list sits in its object's index dict and, for ephemeral pages, on the global and
the client's FIFO (eviction.py), or, for persistent pages, on its pool's put-order list.
Those lists drop dead descriptors lazily. A fifth slot, present only after a dedup
reprieve, marks that the page already had its one reprieve.

``stored`` is one of:
  * ``bytes`` of exactly PAGE_SIZE   - a raw page (the fast, common case);
  * ``CompressedPage`` (bytes)       - lz4 data, when the owner client compresses;
  * ``Pcd``                          - a shared, deduplicated content (dedup.py);
  * ``RemotePage``                   - a raw ephemeral page whose bytes live in memcached
                                       (store/memcached.py): decoding it may find it gone.

``PageCodec`` turns page data into a stored form and back and knows what each costs
against the host budget (bytes of stored page data).
"""

from __future__ import annotations

from .abi import PAGE_SIZE
from .compress import CompressedPage, compress_page, decompress_page
from .dedup import COMPRESSED, RAW, TRIMMED, DedupTable, Pcd, tze_trim
from .store.memcached import MemcachedPages, RemotePage

DATA, POOL, OID, INDEX = 0, 1, 2, 3
REPRIEVED = 4  # present (True) only on a descriptor that used its dedup reprieve

Stored = bytes | Pcd | RemotePage

ZERO_PAGE = bytes(PAGE_SIZE)


class PageCodec:
    """Encodes pages for storage (compression, dedup, TZE) and accounts their size."""

    def __init__(self, *, dedup: bool, tze: bool, remote: MemcachedPages | None = None) -> None:
        self.dedup: DedupTable | None = DedupTable(tze) if dedup else None
        self.tze = tze and dedup
        self.remote = remote  # where raw ephemeral page bytes go, if not in RAM

    def encode(self, data: bytes, ephemeral: bool, compress: bool, owner_stats: "CompressStats") -> tuple[Stored, int]:
        """The stored form of a full page and the bytes it newly costs."""
        packed: CompressedPage | None = None
        if compress:
            packed = compress_page(data)
            if packed is None:
                owner_stats.compress_poor += 1
            else:
                owner_stats.compressed_pages += 1
                owner_stats.compressed_sum_size += len(packed)
        dedup = self.dedup
        if dedup is not None and ephemeral:
            if packed is not None:
                return dedup.associate(packed, COMPRESSED)
            if self.tze:
                trimmed = tze_trim(data)
                return dedup.associate(trimmed, TRIMMED if len(trimmed) < PAGE_SIZE else RAW)
            return dedup.associate(data, RAW)
        if packed is not None:
            return packed, len(packed)
        if ephemeral and self.remote is not None:
            return self.remote.keep(data), PAGE_SIZE
        return data, PAGE_SIZE

    def release(self, stored: Stored, owner_stats: "CompressStats") -> int:
        """Forget one reference to ``stored``; the bytes that frees."""
        if type(stored) is bytes:
            return PAGE_SIZE
        if type(stored) is RemotePage:
            self.remote.forget(stored)  # type: ignore[union-attr]
            return PAGE_SIZE
        if type(stored) is CompressedPage:
            owner_stats.compressed_pages -= 1
            owner_stats.compressed_sum_size -= len(stored)
            return len(stored)
        assert type(stored) is Pcd and self.dedup is not None
        if stored.kind == COMPRESSED:
            owner_stats.compressed_pages -= 1
            owner_stats.compressed_sum_size -= stored.size
        return self.dedup.disassociate(stored)

    def decode(self, stored: Stored) -> bytes | None:
        """The full page held by a stored form; None only for a remote page that is gone."""
        if type(stored) is bytes:
            return stored
        if type(stored) is RemotePage:
            return self.remote.fetch(stored)  # type: ignore[union-attr]
        if type(stored) is CompressedPage:
            return decompress_page(stored)
        assert type(stored) is Pcd
        if stored.kind == COMPRESSED:
            return decompress_page(stored.data)
        if stored.kind == TRIMMED:
            return stored.data + ZERO_PAGE[len(stored.data):]
        return stored.data


class CompressStats:
    """The per-client compression counters (Xen names), bumped by PageCodec."""

    __slots__ = ("compressed_pages", "compressed_sum_size", "compress_poor", "compress_nomem")

    def __init__(self) -> None:
        self.compressed_pages = 0
        self.compressed_sum_size = 0
        self.compress_poor = 0
        self.compress_nomem = 0  # Python allocation never fails here; kept for the LIST format

