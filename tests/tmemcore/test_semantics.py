"""tmem-abi.md §2-§3 semantics, each with a test; ``check()`` after every step."""

from __future__ import annotations

import errno

import pytest
from tmemtest import PAGE, gen, get, new_pool

from tmemcore import Tmem, abi
from tmemcore.errors import Frozen, InvalidArgument, NoDevice, NotPermitted
from tmemcore.oid import Oid


def pg(fill: int) -> bytes:
    return bytes([fill]) * PAGE


def test_sixteen_pools_per_client_lowest_free_slot() -> None:
    t = Tmem(memory_pages=8)
    c = t.client(3)
    pools = [c.new_pool() for _ in range(16)]
    assert [p.pool_id for p in pools] == list(range(16))
    with pytest.raises(NotPermitted):
        c.new_pool()
    pools[5].destroy()
    pools[2].destroy()
    assert c.new_pool().pool_id == 2 and c.new_pool().pool_id == 5
    t.check()


def test_shared_pools_match_by_uuid_and_track_sharers() -> None:
    t = Tmem(memory_pages=8)
    a = t.client(1).new_pool(shared=True, uuid=(10, 20))
    t.client(2).new_pool()  # slot 0 taken, the shared pool will land in slot 1
    b = t.client(2).new_pool(shared=True, uuid=(10, 20))
    assert b.pool_id == 1 and a.shared and b.shared
    assert a.put(7, 0, pg(1))
    assert b.get(7, 0) == pg(1)  # same pool seen from the other client
    shared = t.stats()["shared"]
    assert len(shared) == 1 and shared[0]["sharers"] == [1, 2] and shared[0]["owner"] == 1
    t.check()


def test_shared_uuid_all_ones_is_silently_private() -> None:
    t = Tmem(memory_pages=8)
    p = t.client(1).new_pool(shared=True, uuid=((1 << 64) - 1, (1 << 64) - 1))
    assert not p.shared and t.stats()["shared"] == []
    t.check()


def test_shared_auth_unauthorized_uuid_is_silently_private() -> None:
    t = Tmem(memory_pages=8, shared_auth=True)
    assert not t.client(1).new_pool(shared=True, uuid=(1, 2)).shared
    t.client(2)
    assert t.authorize(2, (1, 2)) == 1
    assert t.client(2).new_pool(shared=True, uuid=(1, 2)).shared
    assert t.authorize(2, (1, 2), auth=False) == 1 and t.authorize(2, (1, 2), auth=False) == 0
    t.authorize(None, (0, 0))  # the global "auth satisfied" switch
    assert t.client(3).new_pool(shared=True, uuid=(5, 5)).shared
    t.check()


def test_auth_table_has_16_slots() -> None:
    t = Tmem(memory_pages=8, shared_auth=True)
    t.client(1)
    for i in range(16):
        assert t.authorize(1, (i, 0)) == 1
    rc = t.do_tmem_op(0, abi.TmemOp(abi.TMEM_AUTH, arg1=1, uuid=(99, 0), flags=1).encode())
    assert rc == -errno.ENOMEM
    assert t.do_tmem_op(0, abi.TmemOp(abi.TMEM_AUTH, arg1=42, uuid=(99, 0), flags=1).encode()) == -errno.EINVAL


def test_shared_destroy_drops_leaver_objects_and_moves_ownership() -> None:
    t = Tmem(memory_pages=16)
    a = t.client(1).new_pool(shared=True, uuid=(1, 1))
    b = t.client(2).new_pool(shared=True, uuid=(1, 1))
    a.put(100, 0, pg(1))  # last client of object 100: 1
    b.put(200, 0, pg(2))  # last client of object 200: 2
    a.put(300, 0, pg(3))
    assert b.get(300, 0) == pg(3)  # a shared get makes the getter the last client
    t.check()
    assert a.destroy()
    t.check()
    assert b.get(100, 0) is None  # client 1's objects went with it
    assert b.get(200, 0) == pg(2) and b.get(300, 0) == pg(3)
    shared = t.stats()["shared"][0]
    assert shared["owner"] == 2 and shared["sharers"] == [2]
    assert t.client(2).eph_count == 2 and t.client(1).eph_count == 0
    assert b.destroy()
    assert t.stats()["shared"] == []
    t.check()


def test_private_ephemeral_get_is_exclusive() -> None:
    t = Tmem(memory_pages=8)
    p = t.client(1).new_pool()
    p.put(1, 2, pg(9))
    assert p.get(1, 2) == pg(9)
    assert p.get(1, 2) is None
    t.check()


def test_shared_ephemeral_and_persistent_gets_are_not_exclusive() -> None:
    t = Tmem(memory_pages=8)
    shared = t.client(1).new_pool(shared=True, uuid=(4, 4))
    pers = t.client(1).new_pool(persistent=True)
    for p in (shared, pers):
        p.put(1, 2, pg(9))
        assert p.get(1, 2) == pg(9) and p.get(1, 2) == pg(9)
    t.check()


def test_shared_ephemeral_get_refreshes_lru() -> None:
    t = Tmem(memory_pages=3)
    p = t.client(1).new_pool(shared=True, uuid=(4, 4))
    for i in range(3):
        p.put(1, i, pg(i))
    assert p.get(1, 0) == pg(0)  # page 0 becomes the most recent
    p.put(1, 3, pg(3))  # evicts the oldest, now page 1
    assert p.get(1, 1) is None and p.get(1, 0) == pg(0)
    t.check()


def test_get_on_empty_pool_is_eempty_and_not_counted() -> None:
    t = Tmem(memory_pages=8)
    pool = new_pool(t, 1)
    assert get(t, 1, pool, 1, 1)[0] == -1001
    assert t.stats()["clients"][0]["pools"][0]["gets"] == 0
    assert t.client(1).handle(pool).get(1, 1) is None  # the Pythonic API: just a miss


@pytest.mark.parametrize("persistent", [False, True])
def test_duplicate_put_replaces(persistent: bool) -> None:
    t = Tmem(memory_pages=8)
    p = t.client(1).new_pool(persistent=persistent)
    p.put(1, 1, pg(1))
    assert p.put(1, 1, pg(2))
    assert p.get(1, 1) == pg(2)
    counters = t.stats()["clients"][0]["pools"][0]
    assert counters["dup_puts_replaced"] == 1 and counters["pgp_count"] == (1 if persistent else 0)
    t.check()


def test_duplicate_put_that_cannot_store_flushes_old_copy() -> None:
    t = Tmem(memory_pages=8, accept_v0=False)
    p = t.client(1).new_pool(persistent=True)
    p.put(1, 1, pg(1))
    t.set_client_max_pages(1, 0)
    assert p.put(1, 1, pg(2)) is False  # refused ...
    assert p.get(1, 1) is None  # ... and never leaves the old data readable
    assert t.stats()["clients"][0]["pools"][0]["dup_puts_flushed"] == 1
    t.check()


def test_frozen_client_refuses_new_puts_allows_duplicates_and_flushes() -> None:
    t = Tmem(memory_pages=8)
    p = t.client(1).new_pool()
    p.put(1, 1, pg(1))
    p.put(1, 2, pg(2))
    t.freeze(1)
    with pytest.raises(Frozen):
        p.put(1, 3, pg(3))
    assert p.put(1, 1, pg(4))  # duplicate put: allowed
    assert p.flush_page(1, 2) is True
    t.thaw(1)
    assert p.get(1, 1) == pg(4) and p.get(1, 2) is None
    t.check()


def test_persistent_pages_count_against_client_limit_and_are_never_evicted() -> None:
    t = Tmem(memory_pages=4)
    c = t.client(1)
    pers = c.new_pool(persistent=True)
    eph = c.new_pool()
    t.set_client_max_pages(1, 2)
    assert pers.put(1, 0, pg(1)) and pers.put(1, 1, pg(2))
    assert pers.put(1, 2, pg(3)) is False  # -ENOMEM at the limit
    for i in range(20):  # ephemeral churn cannot push persistent pages out
        eph.put(2, i, pg(i))
        t.check()
    assert pers.get(1, 0) == pg(1) and pers.get(1, 1) == pg(2)
    t.set_client_max_pages(1, None)
    assert pers.put(1, 2, pg(3)) and pers.put(1, 3, pg(4))  # evicts ephemeral pages to fit
    assert pers.put(1, 4, pg(5)) is False  # budget full of persistent pages: no room
    assert t.stats()["global"]["global_eph_count"] == 0
    t.check()


def test_oids_are_192_bit_values_and_distinct() -> None:
    t = Tmem(memory_pages=8)
    p = t.client(1).new_pool()
    oids = [Oid.from_words(1, 0, 0), Oid.from_words(0, 1, 0), Oid.from_words(0, 0, 1), Oid.from_words(1, 1, 1)]
    assert sorted(oids) == [oids[0], oids[1], oids[2], oids[3]]  # word 2 most significant
    for i, oid in enumerate(oids):
        p.put(oid, 0, pg(i))
    for i, oid in enumerate(oids):
        assert p.get(oid, 0) == pg(i)
    raw = gen(abi.TMEM_PUT_PAGE, 0, Oid.from_words(5, 6, 7), 9)
    assert raw[8:32] == (5).to_bytes(8, "little") + (6).to_bytes(8, "little") + (7).to_bytes(8, "little")
    t.check()


def test_all_ones_oid_and_bad_index_are_invalid_in_python_api() -> None:
    t = Tmem(memory_pages=8)
    p = t.client(1).new_pool()
    for oid, index in (((1 << 192) - 1, 0), (-1, 0), (1 << 192, 0), (1, 1 << 32), (1, -1), ("x", 0)):
        with pytest.raises(InvalidArgument):
            p.put(oid, index, pg(0))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        p.put(1, 0, b"short")
    assert p.put(1, 0xFFFFFFFF, pg(1)) and p.get(1, 0xFFFFFFFF) == pg(1)  # index is a full u32
    t.check()


def test_destroyed_pool_handle_raises_nodevice() -> None:
    t = Tmem(memory_pages=8)
    p = t.client(1).new_pool()
    p.put(1, 1, pg(1))
    assert p.destroy() and not p.destroy()
    with pytest.raises(NoDevice):
        p.get(1, 1)
    assert t.stats()["global"]["used_bytes"] == 0
    t.check()


def test_flush_object_removes_all_indexes() -> None:
    t = Tmem(memory_pages=8)
    p = t.client(1).new_pool()
    for i in range(5):
        p.put(9, i, pg(i))
    p.put(10, 0, pg(10))
    assert p.flush_object(9) == 5 and p.flush_object(9) == 0
    assert p.get(10, 0) == pg(10)
    t.check()


def test_write_then_read_partial_page() -> None:
    t = Tmem(memory_pages=8)
    pool = new_pool(t, 1, persistent=True)
    src = bytearray(range(256)) * 16
    assert t.do_tmem_op(1, gen(abi.TMEM_WRITE, pool, 3, 0, toff=100, poff=10, length=20), src) == 1
    rc, out = get(t, 1, pool, 3, 0)
    assert rc == 1 and out[100:120] == src[10:30] and out[:100] == bytes(100) and out[120:] == bytes(PAGE - 120)
    assert t.do_tmem_op(1, gen(abi.TMEM_WRITE, pool, 3, 0, toff=0, poff=0, length=4), bytearray(b"\xff") * PAGE) == 1
    rc, out = get(t, 1, pool, 3, 0)
    assert out[:4] == b"\xff" * 4 and out[100:120] == src[10:30]  # the rest of the page is kept
    bad = gen(abi.TMEM_WRITE, pool, 3, 0, toff=4090, poff=0, length=10)
    assert t.do_tmem_op(1, bad, src) == -errno.EFAULT
    t.check()


def test_new_page_stores_zeros() -> None:
    t = Tmem(memory_pages=8)
    pool = new_pool(t, 1)
    assert t.do_tmem_op(1, gen(abi.TMEM_NEW_PAGE, pool, 1, 1)) == 1
    rc, out = get(t, 1, pool, 1, 1)
    assert rc == 1 and out == bytes(PAGE)


def test_destroy_client_frees_everything() -> None:
    t = Tmem(memory_pages=8)
    a = t.client(1)
    a.new_pool().put(1, 1, pg(1))
    a.new_pool(persistent=True).put(1, 1, pg(2))
    shared = a.new_pool(shared=True, uuid=(3, 3))
    other = t.client(2).new_pool(shared=True, uuid=(3, 3))
    shared.put(5, 5, pg(5))
    other.put(6, 6, pg(6))
    assert t.destroy_client(1) and not t.destroy_client(1)
    assert other.get(6, 6) == pg(6) and other.get(5, 5) is None
    assert 1 not in t.clients and t.stats()["global"]["global_pgp_count"] == 1
    t.check()


def test_put_keeps_no_reference_to_guest_buffer() -> None:
    t = Tmem(memory_pages=8)
    pool = new_pool(t, 1)
    buf = bytearray(PAGE)
    assert t.do_tmem_op(1, gen(abi.TMEM_PUT_PAGE, pool, 1, 1), buf) == 1
    buf[:] = b"\x01" * PAGE
    assert get(t, 1, pool, 1, 1)[1] == bytes(PAGE)


def test_joining_a_shared_pool_twice_returns_the_same_slot() -> None:
    t = Tmem(memory_pages=8)
    assert new_pool(t, 1, shared=True, uuid=(8, 8)) == 0
    assert new_pool(t, 1, shared=True, uuid=(8, 8)) == 0  # Xen would list client 1 twice
    assert t.stats()["shared"][0]["sharers"] == [1]
    restore_new = abi.TmemOp(abi.TMEM_RESTORE_NEW, 3, uuid=(8, 8), flags=abi.pool_flags(shared=True), arg1=1)
    assert t.do_tmem_op(0, restore_new.encode()) == -errno.EPERM
    t.check()


def test_duplicate_put_moves_page_to_fifo_tail() -> None:
    t = Tmem(memory_pages=3)
    p = t.client(1).new_pool()
    for i in range(3):
        p.put(1, i, pg(i))
    p.put(1, 0, pg(9))  # replaced: now the most recent
    p.put(1, 3, pg(3))  # evicts the oldest, page 1
    assert p.get(1, 1) is None and p.get(1, 0) == pg(9)
    t.check()


def test_new_pool_rejects_bad_uuid_and_version() -> None:
    t = Tmem(memory_pages=8)
    c = t.client(1)
    for uuid in ((-1, 0), (1 << 64, 0), (1, 2, 3)):
        with pytest.raises(InvalidArgument):
            c.new_pool(shared=True, uuid=uuid)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        c.new_pool(version=2)
    assert all(p is None for p in c.pools)
