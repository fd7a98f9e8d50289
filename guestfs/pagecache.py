"""The first-chance page cache: an LRU of clean pages whose one eviction hook feeds cleancache.

Keys are ``(FileKey, page index)``, values the page's bytes (4096, or fewer for a file's last
page). ``cachetools.LRUCache`` evicts only through ``popitem``; the override hands the evicted
clean page to ``CleanCache.put_page`` (Linux puts a page when it leaves the page cache clean).
Invalidation removes pages with ``discard``/``discard_file``, which never put anything: a page
that is being invalidated may be stale.

Lookups go first-chance -> tmem -> caller's loader. A tmem hit moves the page back here (a
private ephemeral get removed it from the host), so a page is never both here and possibly in
tmem; ``insert`` keeps that true by flushing a tmem copy if a racing reader put one there.

``PageIO`` works a request at a time: ``lookup_run`` serves a run of pages in one pass (one
``CleanCache.get_pages`` for the pages not here) and ``insert_many`` caches a run; when a run is
longer than the cache, the pages it would push straight out again go to tmem directly, with the
same flushes and puts in the same order as inserting them one by one.

Using it without a file (the lab replays traces this way)::

    cache = PageCache(pages, cleancache)
    data, where = cache.get_or_load(FileKey(oid=7, source="synthetic", ino=7), index, loader)
    # where is "page-cache" | "tmem" | "backing"; loader() -> bytes runs only on a double miss

Not thread-safe: ``PageIO`` serialises calls with its lock.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable

import cachetools
from cachetools import LRUCache
from tmemcore.abi import PAGE_SHIFT, PAGE_SIZE

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
        # Views of cachetools' own storage (its page dict and recency OrderedDict). The lookup hit paths
        # only read or reorder them (one C-level dict get and one move_to_end per page instead of four
        # Python frames). The two hot mutations -- storing a new page (``_store``) and evicting the
        # oldest (``popitem``) -- do exactly what LRUCache.__setitem__/popitem do to these two dicts and
        # its size counter, without their Python frames (measured: ~10 % of a lab replay); every other
        # insert or delete goes through cachetools' public methods. Eviction still happens only in
        # ``popitem``, and check() asserts the size counter matches. _lru_internals refuses a
        # cachetools whose internals differ.
        self._pages, self._order = _lru_internals(self)
        self._capacity = pages  # == maxsize (cachetools keeps it private too)

    def popitem(self) -> tuple[int, bytes]:
        """The one eviction hook: drop the least recently used page and offer it to tmem."""
        # What LRUCache.popitem + __delitem__ do (its oldest key out of its order and data dicts,
        # its size counter down), as three C calls instead of five Python frames.
        page_key, _ = self._order.popitem(False)  # the oldest
        data = self._pages.pop(page_key)
        self._Cache__currsize -= 1
        file_id, index = page_key >> _INDEX_BITS, page_key & _INDEX_MASK
        key = self._keys[file_id]
        indexes = self._indexes[file_id]  # _forget_index, inlined (hot path)
        indexes.discard(index)
        if not indexes:
            del self._indexes[file_id]
            del self._ids[self._keys.pop(file_id)]
        self.evictions += 1
        self.cleancache.put_page(key, index, data)
        return page_key, data

    def lookup(self, key: FileKey, index: int) -> tuple[bytes | None, str]:
        """(page, where) from first-chance, else tmem (moving the page here); (None, "") on a miss."""
        file_id = self._ids.get(key)
        if file_id is not None:
            page_key = file_id << _INDEX_BITS | index
            data = self._pages.get(page_key)
            if data is not None:
                self._order.move_to_end(page_key)  # what LRUCache.__getitem__ does
                self.hits += 1
                return data, "page-cache"
        self.misses += 1
        data = self.cleancache.get_page(key, index)
        if data is None:
            return None, ""
        self._store(key, index, data)
        return data, "tmem"

    def lookup_run(self, key: FileKey, first: int, stop: int, file_size: int) -> list[bytes | None]:
        """Pages ``first..stop-1`` of ``key`` in index order: first-chance, else tmem; None = miss.

        One request, one pass: first-chance hits are touched, every other page is asked of tmem in
        one ``CleanCache.get_pages`` call, and the pages tmem returned move here with
        ``insert_many``. Compared with ``lookup`` per page, a tmem hit's insert can no longer evict
        a first-chance page this same request still needs (which would then cost a put and a get).
        A first-chance page that ends before ``file_size`` needs (a short last page from before the
        file grew) is dropped and counted as a miss (tmem pages are full, zero-padded pages).
        """
        cached = self._pages.get
        touch = self._order.move_to_end
        file_id = self._ids.get(key)
        base = -1 if file_id is None else file_id << _INDEX_BITS
        if stop - first == 1:  # a random read: no lists of misses to build
            data = cached(base | first) if base >= 0 else None
            if data is not None:
                if len(data) == PAGE_SIZE or (first << PAGE_SHIFT) + len(data) >= file_size:
                    touch(base | first)
                    self.hits += 1
                    return [data]
                self.discard(key, first)
            self.misses += 1
            data = self.cleancache.get_page(key, first)
            if data is not None:
                self._store(key, first, data)  # just got from tmem: no tmem copy left to flush
            return [data]
        if base >= 0:  # all full first-chance pages (sequential re-reads): C-level loops only
            page_keys = range(base | first, base | stop)
            pages: list[bytes | None] = list(map(cached, page_keys))
            if None not in pages and min(map(len, pages)) == PAGE_SIZE:  # type: ignore[arg-type]
                deque(map(touch, page_keys), maxlen=0)  # move each to the MRU end, in index order
                self.hits += len(pages)
                return pages
        pages = []
        append = pages.append
        missing: list[int] = []
        for index in range(first, stop):
            data = cached(base | index) if base >= 0 else None
            if data is not None:
                if len(data) == PAGE_SIZE or (index << PAGE_SHIFT) + len(data) >= file_size:
                    touch(base | index)
                    append(data)
                    continue
                self.discard(key, index)
            missing.append(index)
            append(None)
        self.hits += len(pages) - len(missing)
        if missing:
            self.misses += len(missing)
            got = self.cleancache.get_pages(key, missing)
            loaded = [(index, data) for index, data in zip(missing, got) if data is not None]
            if loaded:
                for index, data in loaded:
                    pages[index - first] = data
                self.insert_many(key, loaded)
        return pages

    def get_or_load(self, key: FileKey, index: int, loader: Callable[[], bytes]) -> tuple[bytes, str]:
        """(page, "page-cache" | "tmem" | "backing"): first-chance, then tmem, then ``loader()``."""
        file_id = self._ids.get(key)  # lookup, inlined (the lab replays every request through here)
        if file_id is not None:
            page_key = file_id << _INDEX_BITS | index
            data = self._pages.get(page_key)
            if data is not None:
                self._order.move_to_end(page_key)
                self.hits += 1
                return data, "page-cache"
        self.misses += 1
        cleancache = self.cleancache
        data = cleancache.get_page(key, index)
        if data is not None:
            self._store(key, index, data, file_id)  # get_page leaves this cache alone: file_id holds
            return data, "tmem"
        # get_page left this page untracked (a get, hit or miss, untracks it; a page never put was
        # not tracked), and only a put can track it again -- every put_page/put_pages that tracks a
        # page counts ``puts`` first. So unless the loader caused a put, insert's holds() is False.
        puts = cleancache.puts
        data = loader()
        if len(data) > PAGE_SIZE:  # insert, inlined (hot path)
            raise ValueError(f"a page is at most {PAGE_SIZE} bytes, got {len(data)}")
        if cleancache.puts != puts and cleancache.holds(key, index):  # the loader put a copy to tmem
            cleancache.invalidate_page(key, index)
        self._store(key, index, data)  # the loader may have changed this cache: look the file up again
        return data, "backing"

    def insert(self, key: FileKey, index: int, data: bytes) -> None:
        """Cache a clean page just read from the backing file (at most 4096 bytes)."""
        if len(data) > PAGE_SIZE:
            raise ValueError(f"a page is at most {PAGE_SIZE} bytes, got {len(data)}")
        if self.cleancache.holds(key, index):  # a racing reader's copy went to tmem meanwhile
            self.cleancache.invalidate_page(key, index)
        self._store(key, index, data)

    def insert_many(self, key: FileKey, pages: list[tuple[int, bytes]]) -> None:
        """Exactly ``insert`` of each ``(index, page)`` in order (distinct indexes), done faster.

        With more new pages than the cache holds, those inserts would evict everything cached
        now and then the first ``len(pages) - maxsize`` new pages themselves. Those first pages are
        handed to tmem directly instead of passing through the LRU: the host sees the same
        flushes and puts in the same order, and the cache ends in the same state. Falls back to
        plain inserts when a page is already cached (a racing reader loaded it; no eviction then).
        """
        if len(pages) == 1:  # the common random read: nothing to batch
            self.insert(key, *pages[0])
            return
        if max((len(data) for _, data in pages), default=0) > PAGE_SIZE:  # refuse before changing anything
            raise ValueError(f"a page is at most {PAGE_SIZE} bytes")
        maxsize = int(self.maxsize)
        indexes = [index for index, _ in pages]
        file_id = self._ids.get(key)
        if len(pages) <= maxsize or (file_id is not None and not self._indexes[file_id].isdisjoint(indexes)):
            for index, data in pages:
                self.insert(key, index, data)
            return
        passing = len(pages) - maxsize  # new pages that later ones push out again
        if self.cleancache.holds_any(key, indexes):
            self._insert_many_flushing(key, pages)
        else:  # the common case: evict all cached now (LRU order), then the passing pages, in order
            while self._order:
                self.popitem()
            self.evictions += passing
            self.cleancache.put_pages(key, pages[:passing])
        for index, data in pages[passing:]:  # the cache is empty now: no evictions
            self._store(key, index, data)

    def _insert_many_flushing(self, key: FileKey, pages: list[tuple[int, bytes]]) -> None:
        """``insert_many``'s host traffic when some new pages still have a (racing) tmem copy.

        Replays, insert by insert, the flush each insert sends and the eviction it causes; leaves
        the last ``maxsize`` pages for the caller to store into the then empty cache.
        """
        cached_now, free = len(self), int(self.maxsize) - len(self)
        holds, invalidate, put = self.cleancache.holds, self.cleancache.invalidate_page, self.cleancache.put_page
        for position, (index, _) in enumerate(pages):
            if holds(key, index):
                invalidate(key, index)
            victim = position - free  # the insert evicts once the cache is full
            if victim < 0:
                continue
            if victim < cached_now:
                self.popitem()  # the pages cached before go first, in LRU order
            else:
                self.evictions += 1
                put(key, *pages[victim - cached_now])  # a new page pushed out again by later ones

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
        assert len(self._pages) == len(self._order) == len(self) == self.currsize, "cachetools views out of sync"
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

    def _store(self, key: FileKey, index: int, data: bytes, file_id: int | None = None) -> None:
        """Cache a page; ``file_id`` is ``key``'s id when the caller just looked it up (saves a hash)."""
        if file_id is None:
            file_id = self._ids.get(key)
        if file_id is None:
            file_id = self._next_id
            self._next_id += 1
            self._ids[key] = file_id
            self._keys[file_id] = key
            self._indexes[file_id] = set()
        self._indexes[file_id].add(index)  # before the insert: an eviction it causes must not drop this file's id
        page_key = file_id << _INDEX_BITS | index
        pages = self._pages
        if page_key in pages:  # a replacement: no eviction, cachetools does it
            self[page_key] = data
            return
        # A new page: what LRUCache.__setitem__ does (evict through popitem while full, store,
        # append to the recency order, count), without its two Python frames.
        while len(pages) >= self._capacity:
            self.popitem()
        pages[page_key] = data
        self._order[page_key] = None
        self._Cache__currsize += 1

    def _forget_index(self, file_id: int, index: int) -> None:
        indexes = self._indexes[file_id]
        indexes.discard(index)
        if not indexes:
            del self._indexes[file_id]
            del self._ids[self._keys.pop(file_id)]


def _lru_internals(cache: LRUCache) -> tuple[dict[int, bytes], OrderedDict[int, None]]:  # type: ignore[type-arg]
    """cachetools' page dict and recency order (name-mangled since cachetools 4; checked here once,
    with the unsized mode -- no per-item sizes, an int item counter -- that ``_store``/``popitem`` update)."""
    pages = getattr(cache, "_Cache__data", None)
    order = getattr(cache, "_LRUCache__order", None)
    sized = getattr(cache, "_Cache__size", ())  # None: every item counts 1 (no getsizeof)
    if type(pages) is not dict or type(order) is not OrderedDict or sized is not None \
            or type(getattr(cache, "_Cache__currsize", None)) is not int:
        raise RuntimeError(f"unsupported cachetools {cachetools.__version__}: LRUCache internals changed")
    return pages, order


class KernelFirstChance:
    """The first chance is the kernel's page cache (guestfs ``--first-chance kernel``): the daemon
    caches nothing itself, and tmem is an *inclusive* second chance behind the kernel.

    FUSE tells no one when the kernel drops a clean page, so there is no eviction to hook: every
    page the daemon loads from the backing file is put into tmem at once (``insert_many``), and
    tmem gets leave the page there (the CleanCache's pool is shared, so its gets are not
    exclusive). The same calls as :class:`PageCache` (what ``PageIO`` uses), with nothing held.
    """

    maxsize = 0

    def __init__(self, cleancache: CleanCache) -> None:
        self.cleancache = cleancache
        self.hits = 0  # always 0: the kernel's own hits never reach the daemon
        self.misses = 0  # pages asked of tmem
        self.evictions = 0

    def __len__(self) -> int:
        return 0

    def lookup_run(self, key: FileKey, first: int, stop: int, file_size: int) -> list[bytes | None]:
        """Pages ``first..stop-1`` from tmem (each stays there); None = miss."""
        self.misses += stop - first
        if stop - first == 1:
            return [self.cleancache.get_page(key, first)]
        return self.cleancache.get_pages(key, list(range(first, stop)))

    def insert_many(self, key: FileKey, pages: list[tuple[int, bytes]]) -> None:
        """Pages just read from the backing file: into tmem (a duplicate put replaces a racing copy)."""
        self.cleancache.put_pages(key, pages)

    def has_page(self, key: FileKey, index: int) -> bool:
        return False

    def discard(self, key: FileKey, index: int) -> None:
        """Nothing held here (PageIO flushes the tmem copy itself)."""

    def discard_file(self, key: FileKey) -> int:
        return 0

    def clear(self) -> None:
        """Nothing held here."""

    def cached_files(self) -> list[FileKey]:
        return []

    def check(self) -> None:
        assert not self.cleancache.exclusive_gets, "an inclusive second chance needs non-exclusive gets"
