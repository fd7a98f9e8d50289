"""TMEM_CONTROL sub-ops (tmem-abi.md §4), driven through do_tmem_op(0, ...) as libxc does."""

from __future__ import annotations

import errno
import struct

from tmemtest import PAGE, ctrl, gen, get, new_pool, page, put

from tmemcore import Tmem, abi
from tmemcore.errors import EFROZEN

NULL = abi.CLI_ID_NULL


def test_freeze_thaw_destroy() -> None:
    t = Tmem(memory_pages=8)
    pool = new_pool(t, 1)
    new_pool(t, 2)
    assert ctrl(t, abi.TMEMC_FREEZE, 1) == 0
    assert put(t, 1, pool, 1, 1, 1) == -EFROZEN
    assert ctrl(t, abi.TMEMC_DESTROY, 1) == 0  # 4.1: only logs and thaws
    assert put(t, 1, pool, 1, 1, 1) == 1
    assert ctrl(t, abi.TMEMC_FREEZE, NULL) == 0
    assert t.client(2).frozen and t.client(1).frozen
    assert ctrl(t, abi.TMEMC_THAW, NULL) == 0 and not t.client(2).frozen
    assert ctrl(t, abi.TMEMC_THAW, 42) == -1  # unknown client


def test_flush_all_only_and_returns_kib() -> None:
    t = Tmem(memory_pages=8)
    pool = new_pool(t, 1)
    for i in range(4):
        put(t, 1, pool, 1, i, i)
    assert ctrl(t, abi.TMEMC_FLUSH, 1, arg1=4) == -1
    assert ctrl(t, abi.TMEMC_FLUSH, NULL, arg1=9) == 12  # 9 KiB -> 3 pages
    assert t.npages == 1
    t.check()


def test_set_weight_cap_compress_and_query_freeable() -> None:
    t = Tmem(memory_pages=512)
    pool = new_pool(t, 1)
    new_pool(t, 2)
    assert ctrl(t, abi.TMEMC_SET_WEIGHT, 1, arg1=5) == 0
    assert ctrl(t, abi.TMEMC_SET_WEIGHT, NULL, arg1=2) == 0
    assert t.eviction.weight_total == 4  # clients 1 and 2 (control calls do not create client 0)
    assert ctrl(t, abi.TMEMC_SET_CAP, 2, arg1=77) == 0 and t.client(2).cap == 77
    assert ctrl(t, abi.TMEMC_SET_COMPRESS, 1, arg1=1) == 0 and t.client(1).compress
    for i in range(300):
        put(t, 1, pool, 1, i, i)
    assert ctrl(t, abi.TMEMC_QUERY_FREEABLE_MB) == 1  # 300 pages >> 8
    assert ctrl(t, abi.TMEMC_SET_CAP, 9, arg1=1) == -1
    t.check()


def test_unknown_subop_is_minus_1() -> None:
    t = Tmem(memory_pages=8)
    assert ctrl(t, 99) == -1


def test_v0_control_records_need_a_v0_capable_host() -> None:
    assert ctrl(Tmem(memory_pages=8), abi.TMEMC_SAVE_GET_MAXPOOLS, version=0) == -errno.EFAULT
    assert ctrl(Tmem(memory_pages=8, spec_version=0), abi.TMEMC_SAVE_GET_MAXPOOLS, version=0) == 16
    assert ctrl(Tmem(memory_pages=8, accept_v0=True), abi.TMEMC_SAVE_GET_MAXPOOLS, version=0) == 16


def _save_state() -> Tmem:
    t = Tmem(memory_pages=16)
    t.client(3)
    eph = new_pool(t, 3)
    pers = new_pool(t, 3, persistent=True)
    shared = new_pool(t, 3, shared=True, uuid=(0x11, 0x22))
    put(t, 3, eph, 1, 0, 1)
    for i in (5, 2, 9):
        put(t, 3, pers, (1 << 129) | i, i, i)
    ctrl(t, abi.TMEMC_SET_WEIGHT, 3, arg1=7)
    ctrl(t, abi.TMEMC_SET_CAP, 3, arg1=9)
    assert (eph, pers, shared) == (0, 1, 2)
    return t


def test_save_subops() -> None:
    t = _save_state()
    assert ctrl(t, abi.TMEMC_SAVE_BEGIN, 42) == 0  # no such client
    t.client(4)
    assert ctrl(t, abi.TMEMC_SAVE_BEGIN, 4) == 0  # client without pools
    assert ctrl(t, abi.TMEMC_SAVE_BEGIN, 3, arg1=0) == 1
    assert t.client(3).frozen
    assert ctrl(t, abi.TMEMC_SAVE_GET_VERSION, 3) == 1
    assert ctrl(t, abi.TMEMC_SAVE_GET_MAXPOOLS, 3) == 16
    assert ctrl(t, abi.TMEMC_SAVE_GET_CLIENT_WEIGHT, 3) == 7
    assert ctrl(t, abi.TMEMC_SAVE_GET_CLIENT_CAP, 3) == 9
    assert ctrl(t, abi.TMEMC_SAVE_GET_CLIENT_FLAGS, 3) == 0  # not compressing, was not frozen
    v1 = 1 << 24
    assert ctrl(t, abi.TMEMC_SAVE_GET_POOL_FLAGS, 3, pool_id=0) == v1  # version bits included (X-SRFIX2)
    assert ctrl(t, abi.TMEMC_SAVE_GET_POOL_FLAGS, 3, pool_id=1) == v1 | abi.TMEM_POOL_PERSIST
    assert ctrl(t, abi.TMEMC_SAVE_GET_POOL_FLAGS, 3, pool_id=2) == v1 | abi.TMEM_POOL_SHARED
    assert ctrl(t, abi.TMEMC_SAVE_GET_POOL_FLAGS, 3, pool_id=3) == -1
    assert ctrl(t, abi.TMEMC_SAVE_GET_POOL_NPAGES, 3, pool_id=1) == 3
    buf = bytearray(16)
    assert ctrl(t, abi.TMEMC_SAVE_GET_POOL_UUID, 3, pool_id=2, buf=buf) == 0
    assert struct.unpack("<QQ", buf) == (0x11, 0x22)
    assert t.client(3).frozen  # no fall-through into SAVE_END (X-SRFIX1)
    size = abi.HANDLE_V1.size + PAGE
    buf = bytearray(size)
    assert ctrl(t, abi.TMEMC_SAVE_GET_NEXT_PAGE, 3, pool_id=1, arg1=size - 1, buf=buf) == -errno.ENOMEM
    seen = []
    while ctrl(t, abi.TMEMC_SAVE_GET_NEXT_PAGE, 3, pool_id=1, arg1=size, buf=buf) == 1:
        pool_id, index, w0, w1, w2 = abi.HANDLE_V1.unpack_from(buf)
        assert pool_id == 0 and (w0, w1, w2) == (index, 0, 2) and buf[abi.HANDLE_V1.size] == index
        seen.append(index)
    assert seen == [5, 2, 9]  # put order
    assert ctrl(t, abi.TMEMC_SAVE_GET_NEXT_PAGE, 3, pool_id=0, arg1=size, buf=buf) == -1  # ephemeral
    assert ctrl(t, abi.TMEMC_SAVE_GET_NEXT_INV, 3, arg1=size, buf=buf) == 0  # not live: nothing
    assert ctrl(t, abi.TMEMC_SAVE_END, 3) == 0
    assert not t.client(3).frozen
    t.check()


def test_live_save_records_invalidated_pages_and_refuses_dups() -> None:
    t = _save_state()
    t.freeze(3)
    assert ctrl(t, abi.TMEMC_SAVE_BEGIN, 3, arg1=1) == 1
    assert ctrl(t, abi.TMEMC_SAVE_GET_CLIENT_FLAGS, 3) == abi.TMEM_CLIENT_FROZEN
    assert t.do_tmem_op(3, gen(abi.TMEM_FLUSH_PAGE, 1, (1 << 129) | 2, 2)) == -EFROZEN
    assert put(t, 3, 1, (1 << 129) | 5, 5, 0xEE) == -errno.ENOSPC  # dup refused while migrating
    assert t.do_tmem_op(3, gen(abi.TMEM_DESTROY_POOL, 1)) == 0  # pool flush refused while migrating
    buf = bytearray(abi.HANDLE_V1.size)
    handles = []
    while ctrl(t, abi.TMEMC_SAVE_GET_NEXT_INV, 3, arg1=len(buf), buf=buf) == 1:
        handles.append(abi.HANDLE_V1.unpack(buf))
    assert handles == [(1, 2, 2, 0, 2), (1, 5, 5, 0, 2)]
    assert ctrl(t, abi.TMEMC_SAVE_END, 3) == 0
    assert t.client(3).frozen and not t.client(3).live_migrating  # frozen state restored
    assert t.client(3).invalidated == []
    t.check()


def test_restore_subops() -> None:
    t = Tmem(memory_pages=8)
    assert ctrl(t, abi.TMEMC_RESTORE_BEGIN, 5) == 1
    assert ctrl(t, abi.TMEMC_RESTORE_BEGIN, 5) == -1  # exists
    flags = abi.pool_flags(persistent=True)
    restore_new = abi.TmemOp(abi.TMEM_RESTORE_NEW, 4, uuid=(0, 0), flags=flags, arg1=5).encode()
    assert t.do_tmem_op(0, restore_new) == 4  # explicit pool id
    assert t.do_tmem_op(0, restore_new) == -errno.EPERM  # slot in use
    missing = abi.TmemOp(abi.TMEM_RESTORE_NEW, 0, flags=flags, arg1=6).encode()
    assert t.do_tmem_op(0, missing) == -errno.EPERM  # no such client
    data = page(0x5A)
    assert ctrl(t, abi.TMEMC_RESTORE_PUT_PAGE, 5, pool_id=4, oid=77, arg1=PAGE, arg2=3, buf=data) == 1
    assert ctrl(t, abi.TMEMC_RESTORE_PUT_PAGE, 5, pool_id=3, oid=77, arg1=PAGE, arg2=3, buf=data) == -1
    assert ctrl(t, abi.TMEMC_RESTORE_PUT_PAGE, 5, pool_id=4, oid=77, arg1=100, arg2=3, buf=data) == -errno.EFAULT
    rc, out = get(t, 5, 4, 77, 3)
    assert rc == 1 and out == data
    assert ctrl(t, abi.TMEMC_RESTORE_FLUSH_PAGE, 5, pool_id=4, oid=77, arg2=3) == 1
    assert get(t, 5, 4, 77, 3)[0] == -1001
    t.check()


def test_list_respects_buffer_length_and_nul_terminates() -> None:
    t = Tmem(memory_pages=8)
    new_pool(t, 1)
    buf = bytearray(b"\xff") * 400
    assert ctrl(t, abi.TMEMC_LIST, NULL, arg1=400, buf=buf) == 0
    text = bytes(buf[: buf.index(0)]).decode()
    assert text == t.list_text()[: len(text)] and text.endswith("\n") and text.startswith("G=")
    small = bytearray(30)
    assert ctrl(t, abi.TMEMC_LIST, NULL, arg1=30, buf=small) == 0 and small[0] == 0  # first line too long
    assert ctrl(t, abi.TMEMC_LIST, 1, arg1=400, buf=buf) == 0 and buf.startswith(b"C=CI:1,")
    assert ctrl(t, abi.TMEMC_LIST, 9, arg1=400, buf=buf) == -1
    assert ctrl(t, abi.TMEMC_LIST, NULL, arg1=400, buf=bytearray(10)) == -errno.EFAULT


def test_v0_client_save_uses_v0_handles() -> None:
    t = Tmem(memory_pages=8, accept_v0=True)
    pool = new_pool(t, 2, persistent=True, version=0)
    assert put(t, 2, pool, 0xABCDEF, 7, 3, version=0) == 1
    assert ctrl(t, abi.TMEMC_SAVE_BEGIN, 2, version=0) == 1
    assert ctrl(t, abi.TMEMC_SAVE_GET_VERSION, 2) == 0
    assert ctrl(t, abi.TMEMC_SAVE_GET_POOL_FLAGS, 2, pool_id=pool, version=0) == abi.TMEM_POOL_PERSIST  # version 0 bits
    size = abi.HANDLE_V0.size + PAGE
    buf = bytearray(size)
    assert ctrl(t, abi.TMEMC_SAVE_GET_NEXT_PAGE, 2, pool_id=pool, arg1=size, buf=buf, version=0) == 1
    assert abi.HANDLE_V0.unpack_from(buf) == (0, 7, 0xABCDEF) and buf[abi.HANDLE_V0.size] == 3
    assert ctrl(t, abi.TMEMC_SAVE_GET_NEXT_PAGE, 2, pool_id=pool, arg1=size, buf=buf) == -1
    assert ctrl(t, abi.TMEMC_SAVE_END, 2) == 0
    data = page(1)
    rc = ctrl(t, abi.TMEMC_RESTORE_PUT_PAGE, 2, pool_id=pool, oid=(1 << 64) - 1, arg1=PAGE, arg2=0, buf=data)
    assert rc == -errno.EINVAL  # the v0 terminator oid
    t.check()
