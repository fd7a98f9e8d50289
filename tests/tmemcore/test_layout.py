"""Byte-exact record layouts (x86-64 struct tmem_op), as the host reads them."""

from __future__ import annotations

import struct

from tmemcore import abi
from tmemcore.abi import TmemOp
from tmemcore.oid import Oid


def u32(raw: bytes, off: int) -> int:
    return struct.unpack_from("<I", raw, off)[0]


def u64(raw: bytes, off: int) -> int:
    return struct.unpack_from("<Q", raw, off)[0]


def test_gen_v1_offsets() -> None:
    op = TmemOp(abi.TMEM_PUT_PAGE, 7, Oid.from_words(0x1111, 0x2222, 0x3333), 0x44, 0x55, 0x66, 0x77, 0x8888)
    raw = op.encode(1)
    assert len(raw) == 56
    assert u32(raw, 0) == abi.TMEM_PUT_PAGE and u32(raw, 4) == 7
    assert (u64(raw, 8), u64(raw, 16), u64(raw, 24)) == (0x1111, 0x2222, 0x3333)
    assert (u32(raw, 32), u32(raw, 36), u32(raw, 40), u32(raw, 44)) == (0x44, 0x55, 0x66, 0x77)
    assert u64(raw, 48) == 0x8888


def test_gen_v0_offsets() -> None:
    raw = TmemOp(abi.TMEM_GET_PAGE, 3, Oid(0xABCD), 0x44, 0x55, 0x66, 0x77, 0x8888).encode(0)
    assert len(raw) == 40
    assert u32(raw, 0) == abi.TMEM_GET_PAGE and u32(raw, 4) == 3 and u64(raw, 8) == 0xABCD
    assert (u32(raw, 16), u32(raw, 20), u32(raw, 24), u32(raw, 28)) == (0x44, 0x55, 0x66, 0x77)
    assert u64(raw, 32) == 0x8888


def test_creat_offsets_identical_in_both_versions() -> None:
    op = TmemOp(abi.TMEM_NEW_POOL, 0, uuid=(0x1234, 0x5678), flags=0x01000003, arg1=9)
    v1, v0 = op.encode(1), op.encode(0)
    assert len(v1) == 56 and len(v0) == 40 and v1[:32] == v0[:32]
    assert u64(v1, 8) == 0x1234 and u64(v1, 16) == 0x5678 and u32(v1, 24) == 0x01000003 and u32(v1, 28) == 9


def test_ctrl_offsets() -> None:
    op = TmemOp(abi.TMEM_CONTROL, 2, Oid.from_words(0xA, 0xB, 0xC), subop=19, cli_id=5, arg1=0x1010, arg2=0x2020,
                buf=0xBEEF)
    v1 = op.encode(1)
    assert (u32(v1, 8), u32(v1, 12), u32(v1, 16), u32(v1, 20)) == (19, 5, 0x1010, 0x2020)
    assert (u64(v1, 24), u64(v1, 32), u64(v1, 40), u64(v1, 48)) == (0xA, 0xB, 0xC, 0xBEEF)
    v0 = TmemOp(abi.TMEM_CONTROL, 2, Oid(0xA), subop=19, cli_id=5, arg1=1, arg2=2, buf=0xBEEF).encode(0)
    assert len(v0) == 40 and u64(v0, 24) == 0xA and u64(v0, 32) == 0xBEEF


def test_handles() -> None:
    assert abi.HANDLE_V1.size == 32 and abi.HANDLE_V0.size == 16
    raw = abi.HANDLE_V1.pack(1, 2, 3, 4, 5)
    assert (u32(raw, 0), u32(raw, 4), u64(raw, 8), u64(raw, 16), u64(raw, 24)) == (1, 2, 3, 4, 5)


def test_host_reads_the_oid_words_in_order() -> None:
    from tmemcore import Tmem

    t = Tmem(memory_pages=4)
    pool = t.do_tmem_op(1, abi.new_pool_record(abi.pool_flags()))
    raw = bytearray(56)
    struct.pack_into("<IiQQQIIIIQ", raw, 0, abi.TMEM_PUT_PAGE, pool, 1, 2, 3, 4, 0, 0, 0, 0)
    assert t.do_tmem_op(1, bytes(raw), bytearray(4096)) == 1
    assert t.client(1).handle(pool).get(Oid.from_words(1, 2, 3), 4) == bytes(4096)
