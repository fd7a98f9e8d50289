"""First-chance LRU: the one eviction hook puts to cleancache; tmem hits move pages back."""

from __future__ import annotations

import pytest

from guestfs.cleancache import CleanCache
from guestfs.filekey import FileKey
from guestfs.pagecache import PageCache
from guestfs.transport import MockTransport, NullTransport


def key(n: int) -> FileKey:
    return FileKey(oid=n, source="synthetic", ino=n)


def stamped(k: FileKey, index: int) -> bytes:
    return (k.oid.to_bytes(8, "little") + index.to_bytes(8, "little")) * 256


def make(pages: int) -> tuple[PageCache, CleanCache, MockTransport]:
    host = MockTransport()
    cc = CleanCache(host)
    cc.init_fs()
    return PageCache(pages, cc), cc, host


def test_get_or_load_reports_where_each_page_came_from() -> None:
    cache, cc, _ = make(2)
    loads: list[int] = []

    def loader(i: int):
        return lambda: (loads.append(i), stamped(key(1), i))[1]

    sources = [cache.get_or_load(key(1), i, loader(i))[1] for i in (0, 1, 0, 2, 1, 1, 0)]
    assert sources == ["backing", "backing", "page-cache", "backing", "tmem", "page-cache", "tmem"]
    assert loads == [0, 1, 2]
    cache.check()
    assert cc.stats()["puts"] == 3 and cache.evictions == 3


def test_pages_are_never_mixed_up_between_files() -> None:
    cache, _, _ = make(3)
    for round_ in range(3):
        for n in range(1, 5):
            for i in range(3):
                data, _ = cache.get_or_load(key(n), i, lambda n=n, i=i: stamped(key(n), i))
                assert data == stamped(key(n), i)
        cache.check()


def test_eviction_is_the_only_put_and_discard_never_puts() -> None:
    cache, cc, host = make(2)
    cache.insert(key(1), 0, b"a")
    cache.insert(key(1), 1, b"b")
    cache.discard(key(1), 0)
    assert cache.discard_file(key(1)) == 1
    assert cc.stats()["puts"] == 0 and len(cache) == 0
    cache.insert(key(2), 0, b"c")
    cache.insert(key(2), 1, b"d")
    cache.insert(key(2), 2, b"e")  # evicts (2, 0)
    assert cc.holds(key(2), 0) and host.ops["PUT_PAGE"] == 1
    cache.check()


def test_insert_flushes_a_racing_tmem_copy() -> None:
    cache, cc, _ = make(1)
    cache.insert(key(1), 0, b"x")
    cache.insert(key(1), 1, b"y")  # (1, 0) goes to tmem
    assert cc.holds(key(1), 0)
    cache.insert(key(1), 0, b"x")  # a second reader loaded it from the backing file
    assert not cc.holds(key(1), 0)
    cache.check()


def test_without_a_host_pages_are_just_dropped() -> None:
    cc = CleanCache(NullTransport())
    cc.init_fs()
    cache = PageCache(1, cc)
    assert cache.get_or_load(key(1), 0, lambda: b"a") == (b"a", "backing")
    assert cache.get_or_load(key(1), 1, lambda: b"b") == (b"b", "backing")
    assert cache.get_or_load(key(1), 0, lambda: b"a") == (b"a", "backing")
    cache.check()


def test_clear_drops_without_putting() -> None:
    cache, cc, _ = make(4)
    for i in range(4):
        cache.insert(key(1), i, b"p")
    cache.clear()
    assert len(cache) == 0 and cc.stats()["puts"] == 0 and cache.cached_indexes(key(1)) == frozenset()
    cache.check()


def test_zero_pages_is_refused() -> None:
    cc = CleanCache(NullTransport())
    with pytest.raises(ValueError, match="at least 1 page"):
        PageCache(0, cc)


def test_oversized_page_is_refused_and_changes_nothing() -> None:
    cache, cc, _ = make(1)
    cache.insert(key(1), 0, b"a")
    with pytest.raises(ValueError, match="at most 4096"):
        cache.get_or_load(key(1), 1, lambda: bytes(4097))
    assert len(cache) == 1 and cc.stats()["puts"] == 0
    cache.check()
