"""One test per row of tmem-abi.md §1.4 (return values of guest ops), plus the codes this
host adds (ENOSYS, EINVAL for the terminator oid, XCHG)."""

from __future__ import annotations

import errno

from tmemtest import PAGE, gen, get, new_pool, page, put

from tmemcore import Tmem, abi
from tmemcore.errors import EEMPTY, EFROZEN


def test_new_pool_returns_id_or_eperm() -> None:
    t = Tmem(memory_pages=8)
    assert new_pool(t, 1) == 0 and new_pool(t, 1) == 1  # lowest free slot
    v1 = abi.pool_flags()
    bad = {
        "spec version": abi.pool_flags(version=0),
        "page size": abi.pool_flags(pagesize=8192),
        "precompressed": v1 | abi.TMEM_POOL_PRECOMPRESSED,
        "reserved bits": v1 | 0x100,
    }
    for why, flags in bad.items():
        assert t.do_tmem_op(1, abi.new_pool_record(flags)) == -errno.EPERM, why
    for _ in range(14):
        assert new_pool(t, 1) >= 0
    assert new_pool(t, 1) == -errno.EPERM  # no free slot
    for cid in range(2, 18):  # 16 global shared pools, one per uuid
        assert new_pool(t, cid, shared=True, uuid=(cid, 1)) == 0
    assert new_pool(t, 18, shared=True, uuid=(99, 1)) == -errno.EPERM  # shared slot exhaustion
    t.check()


def test_put_returns_1_or_enomem_efrozen_enospc_efault() -> None:
    t = Tmem(memory_pages=2)
    eph, pers = new_pool(t, 1), new_pool(t, 1, persistent=True)
    assert put(t, 1, eph, 5, 0, 1) == 1
    assert t.do_tmem_op(1, gen(abi.TMEM_WRITE, eph, 5, 1, length=10), page(2)) == 1
    assert t.do_tmem_op(1, gen(abi.TMEM_NEW_PAGE, eph, 5, 2)) == 1
    assert put(t, 1, pers, 6, 0, 3) == 1 and put(t, 1, pers, 6, 1, 4) == 1
    assert put(t, 1, pers, 6, 2, 5) == -errno.ENOMEM  # budget full of persistent pages
    assert put(t, 1, pers, 6, 0, 6) == 1  # duplicate replaces (same size, fits)
    t.freeze(1)
    assert put(t, 1, eph, 7, 0, 7) == -EFROZEN  # new handle into a frozen client
    assert put(t, 1, pers, 6, 0, 8) == 1  # duplicates are allowed while frozen
    t.thaw(1)
    t.set_client_max_pages(1, 1)
    assert put(t, 1, pers, 6, 1, 9) == -errno.ENOSPC  # dup that cannot be stored: flushed
    assert get(t, 1, pers, 6, 1)[0] == 0  # ... and the old copy is gone
    assert t.do_tmem_op(1, gen(abi.TMEM_PUT_PAGE, eph, 5, 0), bytearray(10)) == -errno.EFAULT
    t.check()


def test_get_returns_1_0_or_eempty_efault() -> None:
    t = Tmem(memory_pages=4)
    pool = new_pool(t, 1)
    assert get(t, 1, pool, 1, 0)[0] == -EEMPTY  # pool holds no pages at all
    put(t, 1, pool, 1, 0, 0xAB)
    assert get(t, 1, pool, 1, 1)[0] == 0
    rc, out = get(t, 1, pool, 1, 0)
    assert rc == 1 and out == page(0xAB)
    put(t, 1, pool, 1, 0, 0xAB)
    read = bytearray(PAGE)
    assert t.do_tmem_op(1, gen(abi.TMEM_READ, pool, 1, 0, toff=8, poff=16, length=4), read) == 1
    assert read[16:20] == b"\xab" * 4 and read[:16] == bytes(16)
    put(t, 1, pool, 1, 0, 1)
    assert t.do_tmem_op(1, gen(abi.TMEM_GET_PAGE, pool, 1, 0), bytes(PAGE)) == -errno.EFAULT  # read-only frame
    assert get(t, 1, pool, 1, 0)[0] == 1  # the failed get did not consume the page
    t.check()


def test_flushes_return_1_or_efrozen_and_still_flush() -> None:
    t = Tmem(memory_pages=4)
    pool = new_pool(t, 1)
    assert t.do_tmem_op(1, gen(abi.TMEM_FLUSH_PAGE, pool, 1, 0)) == 1  # nothing there: still 1
    assert t.do_tmem_op(1, gen(abi.TMEM_FLUSH_OBJECT, pool, 1)) == 1
    put(t, 1, pool, 1, 0, 1)
    put(t, 1, pool, 2, 0, 2)
    t.freeze(1)
    assert t.do_tmem_op(1, gen(abi.TMEM_FLUSH_PAGE, pool, 1, 0)) == -EFROZEN
    assert t.do_tmem_op(1, gen(abi.TMEM_FLUSH_OBJECT, pool, 2)) == -EFROZEN
    t.thaw(1)
    assert get(t, 1, pool, 1, 0)[0] == -EEMPTY  # both flushes were performed
    t.check()


def test_destroy_pool_returns_1_or_0_and_enodev_out_of_range() -> None:
    t = Tmem(memory_pages=4)
    pool = new_pool(t, 1)
    assert t.do_tmem_op(1, gen(abi.TMEM_DESTROY_POOL, pool)) == 1
    assert t.do_tmem_op(1, gen(abi.TMEM_DESTROY_POOL, pool)) == 0  # empty slot
    assert t.do_tmem_op(1, gen(abi.TMEM_DESTROY_POOL, 16)) == -errno.ENODEV  # the 2012 bounds check
    t.check()


def test_ops_on_uncreated_or_out_of_range_pool_are_enodev() -> None:
    t = Tmem(memory_pages=4)
    new_pool(t, 1)
    for pool_id in (1, 15, 16, -1, 2**31 - 1):
        assert put(t, 1, pool_id, 1, 0, 1) == -errno.ENODEV
        assert get(t, 1, pool_id, 1, 0)[0] == -errno.ENODEV
    t.check()


def test_disabled_tmem_is_enodev() -> None:
    t = Tmem(memory_pages=4, enabled=False)
    assert new_pool(t, 1) == -errno.ENODEV


def test_record_copy_failure_is_efault() -> None:
    t = Tmem(memory_pages=4)
    pool = new_pool(t, 1)
    assert t.do_tmem_op(1, gen(abi.TMEM_PUT_PAGE, pool, 1, 0)[:50], page(1)) == -errno.EFAULT
    assert t.do_tmem_op(1, b"", page(1)) == -errno.EFAULT
    assert t.do_tmem_op(1, gen(abi.TMEM_PUT_PAGE, pool, 1, 0, version=0), page(1)) == -errno.EFAULT  # v0 layout, v1 client
    assert t.stats()["global"]["failed_copies"] == 3


def test_unknown_cmd_is_enosys_and_xchg_is_0() -> None:
    t = Tmem(memory_pages=4)
    pool = new_pool(t, 1)
    assert t.do_tmem_op(1, gen(77, pool)) == -errno.ENOSYS
    assert t.do_tmem_op(1, gen(abi.TMEM_XCHG, pool, 1, 0)) == 0


def test_put_of_terminator_oid_is_einval() -> None:
    t = Tmem(memory_pages=4, accept_v0=True)
    pool = new_pool(t, 1)
    assert put(t, 1, pool, (1 << 192) - 1, 0, 1) == -errno.EINVAL
    v0pool = new_pool(t, 2, version=0)
    assert put(t, 2, v0pool, (1 << 64) - 1, 0, 1, version=0) == -errno.EINVAL  # v0 terminator: 8 bytes 0xFF
    assert get(t, 1, pool, (1 << 192) - 1, 0)[0] == -EEMPTY  # gets/flushes of it are just misses
    t.check()


def test_control_auth_restore_new_need_client_0() -> None:
    t = Tmem(memory_pages=4)
    assert t.do_tmem_op(1, abi.control_record(abi.TMEMC_LIST, arg1=100), bytearray(100)) == -errno.EPERM
    assert t.do_tmem_op(1, abi.TmemOp(abi.TMEM_AUTH, arg1=1, flags=1).encode()) == -errno.EPERM
    assert t.do_tmem_op(1, abi.TmemOp(abi.TMEM_RESTORE_NEW, arg1=1, flags=abi.pool_flags()).encode()) == -errno.EPERM


def test_bad_client_ids_are_einval() -> None:
    t = Tmem(memory_pages=4)
    for cid in (-1, 0xFFFF, 1 << 20, "1", None, [1]):
        assert new_pool(t, cid) == -errno.EINVAL  # type: ignore[arg-type]
    assert t.clients == {}
