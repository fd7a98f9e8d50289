"""Host-wide page deduplication and trailing-zero elimination (Xen ``tmem_dedup``/``tmem_tze``).

Xen keeps one *page content descriptor* (pcd) per distinct content, in 256 red-black trees
chosen by the first byte, compared by length then bytes. Here one dict keyed by the stored
bytes does the same job: Python compares the full content on a hash match, so equal keys
mean equal content (no false sharing). Each page descriptor that holds a pcd counts one
reference; the data is freed when the last reference goes.

Only ephemeral pages are deduplicated (Xen: persistent pages are charged to their owner,
so sharing them would break the accounting). With TZE a page is stored only up to its last
non-zero 8-byte word; a trimmed size above ``TZE_MAX_SIZE`` keeps the full page.
"""

from __future__ import annotations

from .abi import PAGE_SIZE

TZE_MAX_SIZE = PAGE_SIZE - PAGE_SIZE // 64  # Xen's PCD_TZE_MAX_SIZE: 4032 for 4 KiB pages

# what a pcd's bytes are
RAW, COMPRESSED, TRIMMED = 0, 1, 2


class Pcd:
    """One distinct page content, shared by ``refs`` page descriptors."""

    __slots__ = ("data", "kind", "refs")

    def __init__(self, data: bytes, kind: int) -> None:
        self.data = data
        self.kind = kind
        self.refs = 0

    @property
    def size(self) -> int:
        """Bytes of page data this content costs (charged once, however many refs)."""
        return len(self.data)

    def __repr__(self) -> str:
        return f"Pcd(size={self.size}, kind={self.kind}, refs={self.refs})"


def tze_trim(data: bytes) -> bytes:
    """The page up to its last non-zero 8-byte word (size a multiple of 8), or the full
    page when that would exceed TZE_MAX_SIZE. An all-zero page trims to b""."""
    size = len(data.rstrip(b"\0"))
    size = (size + 7) & ~7
    if size > TZE_MAX_SIZE:
        return data
    return data[:size]


class DedupTable:
    """All pcds of the host, keyed by their stored bytes. Counters use Xen's names."""

    def __init__(self, tze: bool) -> None:
        self.tze = tze
        self.table: dict[bytes, Pcd] = {}
        self.deduped_puts = 0
        self.pcd_count_max = 0
        self.pcd_tot_tze_size = 0  # Zt
        self.pcd_tot_csize = 0  # Gz

    def associate(self, stored: bytes, kind: int) -> tuple[Pcd, int]:
        """A reference to the pcd holding ``stored`` and the bytes it newly costs (0 on a match)."""
        pcd = self.table.get(stored)
        if pcd is not None:
            pcd.refs += 1
            self.deduped_puts += 1
            return pcd, 0
        pcd = Pcd(stored, kind)
        pcd.refs = 1
        self.table[stored] = pcd
        if len(self.table) > self.pcd_count_max:
            self.pcd_count_max = len(self.table)
        self._account(pcd, +1)
        return pcd, pcd.size

    def disassociate(self, pcd: Pcd) -> int:
        """Drop one reference; the bytes freed (pcd size when it was the last one, else 0)."""
        pcd.refs -= 1
        if pcd.refs:
            return 0
        del self.table[pcd.data]
        self._account(pcd, -1)
        return pcd.size

    def _account(self, pcd: Pcd, sign: int) -> None:
        # Xen's pcd_tot_tze_size / pcd_tot_csize, including its habit of counting full pages
        if pcd.kind == COMPRESSED:
            self.pcd_tot_csize += sign * pcd.size
        elif self.tze:
            self.pcd_tot_tze_size += sign * pcd.size

    @property
    def pcd_count(self) -> int:
        return len(self.table)

    def check(self, refs_seen: dict[int, int]) -> None:
        """``refs_seen`` maps id(pcd) -> number of page descriptors found pointing at it."""
        ids = {id(p): p for p in self.table.values()}
        assert set(ids) == set(refs_seen), "dedup table and referencing pages disagree"
        for key, pcd in self.table.items():
            assert key is pcd.data or key == pcd.data, "pcd filed under the wrong content"
            assert pcd.refs == refs_seen[id(pcd)] > 0, f"{pcd!r}: refcount != referencing pages"
        csize = sum(p.size for p in self.table.values() if p.kind == COMPRESSED)
        assert csize == self.pcd_tot_csize, "pcd_tot_csize drifted"
        if self.tze:
            tsize = sum(p.size for p in self.table.values() if p.kind != COMPRESSED)
            assert tsize == self.pcd_tot_tze_size, "pcd_tot_tze_size drifted"
