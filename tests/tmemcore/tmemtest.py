"""Shared helpers for the tmemcore host tests: raw records and guest pages (imported as `tmemtest`)."""

from __future__ import annotations

from tmemcore import Tmem, abi
from tmemcore.abi import TmemOp
from tmemcore.oid import Oid

PAGE = abi.PAGE_SIZE


def page(fill: int) -> bytearray:
    return bytearray([fill & 0xFF]) * PAGE


def gen(cmd: int, pool_id: int, oid: int = 0, index: int = 0, *, version: int = 1,
        toff: int = 0, poff: int = 0, length: int = 0) -> bytes:
    return TmemOp(cmd, pool_id, Oid(oid), index, toff, poff, length).encode(version)


def new_pool(tmem: Tmem, cid: int, *, persistent: bool = False, shared: bool = False,
             uuid: tuple[int, int] = (0, 0), version: int = 1, record_version: int | None = None) -> int:
    flags = abi.pool_flags(persistent=persistent, shared=shared, version=version)
    return tmem.do_tmem_op(cid, abi.new_pool_record(flags, uuid, record_version if record_version is not None else version))


def put(tmem: Tmem, cid: int, pool_id: int, oid: int, index: int, fill: int, version: int = 1) -> int:
    return tmem.do_tmem_op(cid, gen(abi.TMEM_PUT_PAGE, pool_id, oid, index, version=version), page(fill))


def get(tmem: Tmem, cid: int, pool_id: int, oid: int, index: int, version: int = 1) -> tuple[int, bytearray]:
    out = bytearray(PAGE)
    rc = tmem.do_tmem_op(cid, gen(abi.TMEM_GET_PAGE, pool_id, oid, index, version=version), out)
    return rc, out


def ctrl(tmem: Tmem, subop: int, cli_id: int = abi.CLI_ID_NULL, arg1: int = 0, arg2: int = 0, oid: int = 0,
         pool_id: int = 0, buf: bytearray | None = None, version: int = 1) -> int:
    return tmem.do_tmem_op(0, abi.control_record(subop, cli_id, arg1, arg2, oid, pool_id, version), buf)

