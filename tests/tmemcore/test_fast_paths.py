"""The hot paths give exactly what the general code gives.

``Tmem.do_tmem_op`` (hypercall.fast_entry) answers full-page PUT/GET itself, and a plain
host without weights evicts through ``Tmem._evict_oldest`` instead of ``choose_victim``.
Here the same random op sequence runs on a host using those shortcuts and on one forced
through the general code (``Hypercall.do_tmem_op``, and ``plain = False``, which routes
puts through the codec and eviction through ``choose_victim``): return codes, guest
frames and every counter (``stats()``) must agree step by step, and ``check()`` hold.
"""

from __future__ import annotations

import functools

from hypothesis import given, settings
from hypothesis import strategies as st

from tmemcore import Tmem, abi

from tmemtest import gen, page

PAGE = abi.PAGE_SIZE
OPS = st.lists(
    st.tuples(
        st.sampled_from([abi.TMEM_PUT_PAGE, abi.TMEM_GET_PAGE, abi.TMEM_FLUSH_PAGE, abi.TMEM_FLUSH_OBJECT]),
        st.integers(0, 2),  # pool id (2: no such pool)
        st.sampled_from([0, 1, 2**70, 2**192 - 1]),  # oid (the last one is the terminator)
        st.integers(0, 5),  # index
        st.integers(0, 255),  # fill
    ),
    max_size=80,
)


def make_host(general: bool, pages: int, persistent_second: bool) -> tuple[Tmem, object]:
    tmem = Tmem(memory_pages=pages)
    if general:
        tmem.plain = False  # raw pages still (no codec feature on), but through PageCodec and choose_victim
        entry = tmem.hypercall.do_tmem_op
    else:
        entry = tmem.do_tmem_op
    assert entry(1, abi.new_pool_record(abi.pool_flags())) == 0
    assert entry(1, abi.new_pool_record(abi.pool_flags(persistent=persistent_second))) == 1
    return tmem, entry


@settings(max_examples=150, deadline=None)
@given(ops=OPS, pages=st.integers(1, 6), persistent_second=st.booleans(), frozen_at=st.integers(0, 100))
def test_fast_and_general_paths_agree(ops: list[tuple[int, int, int, int, int]], pages: int,
                                      persistent_second: bool, frozen_at: int) -> None:
    fast, fast_op = make_host(False, pages, persistent_second)
    slow, slow_op = make_host(True, pages, persistent_second)
    for step, (cmd, pool_id, oid, index, fill) in enumerate(ops):
        if step == frozen_at:
            fast.freeze(1)
            slow.freeze(1)
        record = gen(cmd, pool_id, oid, index)
        frame_fast, frame_slow = page(fill), page(fill)
        assert fast_op(1, record, frame_fast) == slow_op(1, record, frame_slow)  # type: ignore[operator]
        assert frame_fast == frame_slow
        assert fast.stats() == slow.stats()
        fast.check()
        slow.check()


def test_fast_path_counts_like_the_general_path() -> None:
    """Hits, misses, EEMPTY, bad frames and the terminator oid: same codes, same op counters."""
    fast = Tmem(memory_pages=2)
    assert fast.do_tmem_op(1, abi.new_pool_record(abi.pool_flags())) == 0
    put = gen(abi.TMEM_PUT_PAGE, 0, 7, 1)
    get = gen(abi.TMEM_GET_PAGE, 0, 7, 1)
    assert fast.do_tmem_op(1, get, bytearray(PAGE)) == -1001  # EEMPTY: no pages yet
    assert fast.do_tmem_op(1, put, page(3)) == 1
    out = bytearray(PAGE)
    assert fast.do_tmem_op(1, get, out) == 1 and out == page(3)
    assert fast.do_tmem_op(1, put, bytearray(10)) == -14  # EFAULT: short frame (general path)
    assert fast.do_tmem_op(1, gen(abi.TMEM_PUT_PAGE, 0, 2**192 - 1, 0), page(1)) == -22  # terminator oid
    assert fast.do_tmem_op(1, gen(abi.TMEM_PUT_PAGE, -1, 7, 1), page(1)) == -19  # pool -1
    assert fast.hypercall.total_tmem_ops == 7  # NEW_POOL + the six above
    assert fast.hypercall.errored_tmem_ops == 4 and fast.hypercall.failed_copies == 1
    fast.check()


def test_disabling_the_host_is_seen_by_an_entry_bound_earlier() -> None:
    """A guest transport binds ``tmem.do_tmem_op`` once (functools.partial); the fast path
    must still answer -ENODEV once the host is disabled."""
    t = Tmem(memory_pages=2)
    call = functools.partial(t.do_tmem_op, 1)
    assert call(abi.new_pool_record(abi.pool_flags())) == 0
    t.enabled = False
    assert call(gen(abi.TMEM_PUT_PAGE, 0, 1, 1), page(1)) == -19  # ENODEV
    assert t.npages == 0
    t.enabled = True
    assert call(gen(abi.TMEM_PUT_PAGE, 0, 1, 1), page(1)) == 1
    t.check()


@settings(max_examples=100, deadline=None)
@given(ops=OPS, pages=st.integers(1, 6), general=st.booleans(), feature=st.sampled_from(["plain", "compress", "dedup"]))
def test_a_bytes_frame_put_is_a_bytearray_frame_put(ops: list[tuple[int, int, int, int, int]], pages: int,
                                                    general: bool, feature: str) -> None:
    """The guest may hand a put an immutable ``bytes`` page, which the host keeps without a copy:
    return codes, later gets and every counter equal those of a ``bytearray`` frame, on the fast
    and the general path, with and without compression or dedup (the codec paths)."""
    options = {"plain": {}, "compress": {"compress": True}, "dedup": {"dedup": True, "tze": True}}[feature]
    hosts, entries = [], []
    for _ in range(2):
        tmem = Tmem(memory_pages=pages, **options)
        entry = tmem.hypercall.do_tmem_op if general else tmem.do_tmem_op
        assert entry(1, abi.new_pool_record(abi.pool_flags())) == 0
        hosts.append(tmem)
        entries.append(entry)
    for cmd, pool_id, oid, index, fill in ops:
        record = gen(cmd, pool_id, oid, index)
        if cmd == abi.TMEM_PUT_PAGE:
            frames = [bytes(page(fill)), page(fill)]
        else:
            frames = [page(fill), page(fill)]
        assert entries[0](1, record, frames[0]) == entries[1](1, record, frames[1])
        assert bytes(frames[0]) == bytes(frames[1])
        assert hosts[0].stats() == hosts[1].stats()
    for tmem in hosts:
        tmem.check()


EVICTING_OPS = st.lists(
    st.tuples(
        st.sampled_from([abi.TMEM_PUT_PAGE] * 6 + [abi.TMEM_GET_PAGE, abi.TMEM_FLUSH_PAGE, abi.TMEM_FLUSH_OBJECT]),
        st.integers(1, 2),  # client
        st.integers(0, 1),  # pool id (both ephemeral; pool 1 shared when asked)
        st.integers(0, 3),  # oid
        st.integers(0, 7),  # index
    ),
    min_size=20,
    max_size=120,
)


@settings(max_examples=150, deadline=None)
@given(ops=EVICTING_OPS, pages=st.integers(1, 5), shared=st.booleans(), live_at=st.integers(0, 200))
def test_evict_one_store_one_put_equals_make_room(ops: list[tuple[int, int, int, int, int]], pages: int,
                                                   shared: bool, live_at: int) -> None:
    """On a full plain host most puts evict exactly one page; when it is a raw page of the same
    pool, ``TmemPool.put`` evicts and stores in one step, leaving out the counts that cancel.
    Against ``make_room`` + ``choose_victim`` + a plain store (the general host): same codes,
    frames and counters after every step, with victims of the same pool, of another pool of the
    same client, of another client, and of a shared pool, and duplicates while live-migrating."""
    fast = Tmem(memory_pages=pages)
    slow = Tmem(memory_pages=pages)
    slow.plain = False
    entries = {fast: fast.do_tmem_op, slow: slow.hypercall.do_tmem_op}
    for tmem, entry in entries.items():
        for client in (1, 2):
            assert entry(client, abi.new_pool_record(abi.pool_flags())) == 0
            flags = abi.pool_flags(shared=shared)
            assert entry(client, abi.new_pool_record(flags, uuid=(5, 6) if shared else (0, 0))) == 1
    for step, (cmd, client, pool_id, oid, index) in enumerate(ops):
        if step == live_at:
            for tmem in entries:
                tmem.client(1).live_migrating = True
        record = gen(cmd, pool_id, oid, index)
        frame_fast, frame_slow = page(step), page(step)
        assert entries[fast](client, record, bytes(frame_fast) if cmd == abi.TMEM_PUT_PAGE else frame_fast) \
            == entries[slow](client, record, frame_slow)
        assert frame_fast == frame_slow
        assert fast.stats() == slow.stats()
    fast.check()
    slow.check()
