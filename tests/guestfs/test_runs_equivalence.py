"""insert_many == insert per page; lookup_run == the one-request semantics; get_pages == get_page per page."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from guestfs.cleancache import CleanCache
from guestfs.filekey import FileKey
from guestfs.pagecache import PageCache
from guestfs.transport import MockTransport


class LoggingMock(MockTransport):
    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[int, int, int]] = []

    def call(self, op: bytes, page: bytearray | None = None) -> int:
        from tmemcore import abi
        r = abi.TmemOp.decode(op)
        self.log.append((r.cmd, int(r.oid), r.index))
        return super().call(op, page)


def key(n: int) -> FileKey:
    return FileKey(oid=n, source="synthetic", ino=n)


def page(n: int, i: int) -> bytes:
    return bytes([n, i % 256]) * 2048


def make(size: int) -> tuple[PageCache, CleanCache, LoggingMock]:
    host = LoggingMock()
    cc = CleanCache(host)
    cc.init_fs()
    return PageCache(size, cc), cc, host


def state(cache: PageCache, cc: CleanCache, host: LoggingMock) -> tuple:
    def named(pk: int) -> tuple:
        return cache._keys[pk >> 64], pk & ((1 << 64) - 1)
    return ([named(pk) for pk in cache._order], {named(pk): v for pk, v in cache._pages.items()}, cache.evictions, cache.hits, cache.misses,
            cc.stats(), {p: dict(v) for p, v in host.pools.items()}, host.log)


setup_ops = st.lists(st.tuples(st.integers(1, 3), st.integers(0, 20)), max_size=30)


@settings(max_examples=1500, deadline=None)
@given(size=st.integers(1, 6), setup=setup_ops, n=st.integers(1, 3),
       indexes=st.lists(st.integers(0, 20), unique=True, max_size=15))
def test_insert_many_is_insert_per_page(size: int, setup: list, n: int, indexes: list[int]) -> None:
    a, b = make(size), make(size)
    for cache, cc, host in (a, b):
        for f, i in setup:
            cache.get_or_load(key(f), i, lambda f=f, i=i: page(f, i))
    items = [(i, page(n, i)) for i in indexes]
    a[0].insert_many(key(n), items)
    for i, d in items:
        b[0].insert(key(n), i, d)
    a[0].check(); b[0].check()
    assert state(*a) == state(*b)


@settings(max_examples=1500, deadline=None)
@given(size=st.integers(1, 6), setup=setup_ops, n=st.integers(1, 3), first=st.integers(0, 15), count=st.integers(1, 8))
def test_lookup_run_returns_right_pages_and_keeps_invariants(size: int, setup: list, n: int, first: int, count: int) -> None:
    cache, cc, host = make(size)
    for f, i in setup:
        cache.get_or_load(key(f), i, lambda f=f, i=i: page(f, i))
    before_fc = {i for i in range(first, first + count) if cache.has_page(key(n), i)}
    before_tmem = {i for i in range(first, first + count) if cc.holds(key(n), i)}
    hits, misses = cache.hits, cache.misses
    pages = cache.lookup_run(key(n), first, first + count, 1 << 30)
    cache.check(); cc.check()
    for i, p in zip(range(first, first + count), pages):
        if i in before_fc:
            assert p == page(n, i)
        elif p is not None:
            assert p == page(n, i) and i in before_tmem
    assert cache.hits - hits == len(before_fc)
    assert cache.misses - misses == count - len(before_fc)
    # every page served from tmem is cached again unless this request pushed it out
    got = [i for i, p in zip(range(first, first + count), pages) if p is not None]
    for i in got[-size:]:
        assert cache.has_page(key(n), i) or cc.holds(key(n), i)


@settings(max_examples=200, deadline=None)
@given(setup=setup_ops, n=st.integers(1, 3), indexes=st.lists(st.integers(0, 20), max_size=10))
def test_get_pages_is_get_page_per_index(setup: list, n: int, indexes: list[int]) -> None:
    a, b = make(2), make(2)
    for cache, cc, host in (a, b):
        for f, i in setup:
            cache.get_or_load(key(f), i, lambda f=f, i=i: page(f, i))
    ra = a[1].get_pages(key(n), indexes)
    rb = [b[1].get_page(key(n), i) for i in indexes]
    assert ra == rb
    assert state(*a) == state(*b)
    a[1].check()
