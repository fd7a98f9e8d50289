"""The first-chance page cache: an LRU of clean pages whose one eviction hook feeds cleancache.

Keys are ``(FileKey, page index)``, values the page's bytes (4096, or fewer for a file's last
page). ``cachetools.LRUCache`` evicts only through ``popitem``; the override hands the evicted
clean page to ``CleanCache.put_page`` (Linux puts a page when it leaves the page cache clean).
Invalidation removes pages with ``discard``/``discard_file``, which never put anything: a page
that is being invalidated may be stale.

Lookups go first-chance -> tmem -> caller's loader. A tmem hit moves the page back here (a
private ephemeral get removed it from the host), so a page is never both here and possibly in
tmem; ``insert`` keeps that true by flushing a tmem copy if a racing reader put one there.

Using it without a file (the lab replays traces this way)::

    cache = PageCache(pages, cleancache)
    data, where = cache.get_or_load(FileKey(oid=7, source="synthetic", ino=7), index, loader)
    # where is "page-cache" | "tmem" | "backing"; loader() -> bytes runs only on a double miss

Not thread-safe: ``PageIO`` serialises calls with its lock.
"""

from __future__ import annotations

from collections.abc import Callable

from cachetools import LRUCache
from tmemcore.abi import PAGE_SIZE

from .cleancache import CleanCache
from .filekey import FileKey

_INDEX_BITS = 64  # a page key is file_id << 64 | index: int hashing keeps the hot path in C
_INDEX_MASK = (1 << _INDEX_BITS) - 1


class PageCache(LRUCache):  # type: ignore[type-arg]
    """First-chance LRU of clean pages, ``maxsize`` counted in pages.

    Internally a page is keyed by the int ``file_id << 64 | index``, where ``file_id`` is a
    small number handed out per ``FileKey`` while the file has cached pages (never reused), so
    the LRU's dict operations hash ints instead of FileKeys.
    """

    def __init__(self, pages: int, cleancache: CleanCache) -> None:
        if pages < 1:
            raise ValueError(f"the first-chance page cache needs at least 1 page, got {pages}")
        super().__init__(maxsize=pages)
        self.cleancache = cleancache
        self._ids: dict[FileKey, int] = {}
        self._keys: dict[int, FileKey] = {}
        self._indexes: dict[int, set[int]] = {}  # cached page indexes per file id (for invalidation)
        self._next_id = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def popitem(self) -> tuple[int, bytes]:
        """The one eviction hook: drop the least recently used page and offer it to tmem."""
        page_key, data = super().popitem()
        file_id, index = page_key >> _INDEX_BITS, page_key & _INDEX_MASK
        key = self._keys[file_id]
        self._forget_index(file_id, index)
        self.evictions += 1
        self.cleancache.put_page(key, index, data)
        return page_key, data

    def lookup(self, key: FileKey, index: int) -> tuple[bytes | None, str]:
        """(page, where) from first-chance, else tmem (moving the page here); (None, "") on a miss."""
        file_id = self._ids.get(key)
        if file_id is not None:
            page_key = file_id << _INDEX_BITS | index
            if page_key in self:
                self.hits += 1
                return self[page_key], "page-cache"
        self.misses += 1
        data = self.cleancache.get_page(key, index)
        if data is None:
            return None, ""
        self._store(key, index, data)
        return data, "tmem"

    def get_or_load(self, key: FileKey, index: int, loader: Callable[[], bytes]) -> tuple[bytes, str]:
        """(page, "page-cache" | "tmem" | "backing"): first-chance, then tmem, then ``loader()``."""
        data, where = self.lookup(key, index)
        if data is not None:
            return data, where
        data = loader()
        self.insert(key, index, data)
        return data, "backing"

    def insert(self, key: FileKey, index: int, data: bytes) -> None:
        """Cache a clean page just read from the backing file (at most 4096 bytes)."""
        if len(data) > PAGE_SIZE:
            raise ValueError(f"a page is at most {PAGE_SIZE} bytes, got {len(data)}")
        if self.cleancache.holds(key, index):  # a racing reader's copy went to tmem meanwhile
            self.cleancache.invalidate_page(key, index)
        self._store(key, index, data)

    def discard(self, key: FileKey, index: int) -> None:
        """Drop one page without offering it to tmem."""
        file_id = self._ids.get(key)
        if file_id is None:
            return
        page_key = file_id << _INDEX_BITS | index
        if page_key in self:
            del self[page_key]
            self._forget_index(file_id, index)

    def discard_file(self, key: FileKey) -> int:
        """Drop all of a file's pages without offering them to tmem; returns how many."""
        file_id = self._ids.pop(key, None)
        if file_id is None:
            return 0
        del self._keys[file_id]
        indexes = self._indexes.pop(file_id)
        for index in indexes:
            del self[file_id << _INDEX_BITS | index]
        return len(indexes)

    def clear(self) -> None:
        """Drop every page without offering any to tmem (the pool is going away)."""
        super().clear()
        self._ids.clear()
        self._keys.clear()
        self._indexes.clear()

    def has_page(self, key: FileKey, index: int) -> bool:
        """True when the page is in the first-chance cache (no LRU update, no tmem lookup)."""
        file_id = self._ids.get(key)
        return file_id is not None and (file_id << _INDEX_BITS | index) in self

    def cached_indexes(self, key: FileKey) -> frozenset[int]:
        file_id = self._ids.get(key)
        return frozenset(self._indexes.get(file_id, ())) if file_id is not None else frozenset()

    def cached_files(self) -> list[FileKey]:
        return list(self._ids)

    def check(self) -> None:
        """Assert: ids, keys and per-file indexes mirror the LRU exactly; no page is also in tmem."""
        assert len(self) <= self.maxsize
        assert len(self._ids) == len(self._keys) == len(self._indexes)
        assert sum(len(s) for s in self._indexes.values()) == len(self)
        for key, file_id in self._ids.items():
            assert self._keys[file_id] is key and file_id < self._next_id
            assert self._indexes[file_id], f"empty index set left for {key}"
        for page_key in self:
            file_id, index = page_key >> _INDEX_BITS, page_key & _INDEX_MASK
            assert index in self._indexes[file_id], f"cached page {page_key:#x} is not indexed"
            key = self._keys[file_id]
            assert not self.cleancache.holds(key, index), f"page {key}/{index} is both cached and in tmem"

    def _store(self, key: FileKey, index: int, data: bytes) -> None:
        file_id = self._ids.get(key)
        if file_id is None:
            file_id = self._next_id
            self._next_id += 1
            self._ids[key] = file_id
            self._keys[file_id] = key
            self._indexes[file_id] = set()
        indexes = self._indexes[file_id]
        indexes.add(index)  # before the insert: an eviction it causes must not drop this file's id
        self[file_id << _INDEX_BITS | index] = data  # may evict through popitem first

    def _forget_index(self, file_id: int, index: int) -> None:
        indexes = self._indexes[file_id]
        indexes.discard(index)
        if not indexes:
            del self._indexes[file_id]
            del self._ids[self._keys.pop(file_id)]
