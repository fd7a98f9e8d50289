"""``do_tmem_op``: the ONE place where tmem failures become Xen return codes.

Everything below raises (errors.py); this layer decodes the raw ``struct tmem_op`` record
(layouts in abi.py), calls the same internal methods the Pythonic API uses, and turns a
``TmemError`` into ``-errno``. It never raises for any input record.

Record rules:
  * NEW_POOL, AUTH, RESTORE_NEW use the ``creat`` layout, identical in v0 and v1 except for
    its length; either length is read and the flags' version field decides (so a v0 guest
    on a v1-only host gets -EPERM, as on Xen 4.1);
  * other records must have the length of the calling client's version (56 for v1, 40 for
    v0; before its first pool: any version the host accepts), else -EFAULT ("copy from
    guest failed");
  * CONTROL records (client 0 only, else -EPERM) may use any layout the host accepts.

Return codes: NEW_POOL -> pool id; PUT/WRITE/NEW_PAGE -> 1; GET/READ -> 1 hit, 0 miss,
-EEMPTY on a pool without pages; FLUSH_PAGE/FLUSH_OBJECT -> 1 (-EFROZEN when the client is
frozen, the flush being done anyway); DESTROY_POOL -> 1 destroyed / 0 empty slot; XCHG ->
0 (Xen 4.1); unknown cmd -> -ENOSYS; bad/uncreated pool id -> -ENODEV; PUT of the all-ones
(terminator) oid or a client id outside 0..0xFFFE -> -EINVAL; bad page buffer or offsets -> -EFAULT.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Callable

from . import abi
from .abi import (
    CLI_ID_NULL,
    MAX_POOLS_PER_DOMAIN,
    PAGE_SIZE,
    TMEM_AUTH,
    TMEM_CONTROL,
    TMEM_DESTROY_POOL,
    TMEM_FLUSH_OBJECT,
    TMEM_FLUSH_PAGE,
    TMEM_GET_PAGE,
    TMEM_NEW_PAGE,
    TMEM_NEW_POOL,
    TMEM_PUT_PAGE,
    TMEM_READ,
    TMEM_RESTORE_NEW,
    TMEM_WRITE,
    TMEM_XCHG,
)
from .errors import EFROZEN, BadAddress, Empty, InvalidArgument, NotImplementedOp, NotPermitted, NoDevice, TmemError
from .oid import OID_MAX, V0_OID_MAX

if TYPE_CHECKING:
    from .client import Client
    from .pool import TmemPool
    from .tmem import Tmem

# The layouts live in abi.py; these are its precompiled structs, bound once for speed.
_GEN_V1: struct.Struct = abi.GEN_V1
_GEN_V0: struct.Struct = abi.GEN_V0
_CREAT_V1: struct.Struct = abi.CREAT_V1
_CREAT_V0: struct.Struct = abi.CREAT_V0
_CMD: struct.Struct = abi.CMD

# The hot path reads only what a full-page PUT/GET needs (header, oid, index). pool_id is read
# as a u32 here so that one ``< MAX_POOLS_PER_DOMAIN`` test also rejects negative ids.
_HEAD_V1 = struct.Struct("<IIQQQI")
_HEAD_V0 = struct.Struct("<IIQI")

V1_SIZE = _GEN_V1.size  # 56
V0_SIZE = _GEN_V0.size  # 40
GEN_CMDS = frozenset({
    TMEM_DESTROY_POOL, TMEM_NEW_PAGE, TMEM_PUT_PAGE, TMEM_GET_PAGE, TMEM_FLUSH_PAGE,
    TMEM_FLUSH_OBJECT, TMEM_READ, TMEM_WRITE, TMEM_XCHG,
})  # fmt: skip
ZERO_PAGE = bytes(PAGE_SIZE)


DoTmemOp = Callable[..., int]


def fast_entry(hypercall: "Hypercall") -> DoTmemOp:
    """``Tmem.do_tmem_op``: a full-page PUT or GET (a bytes record of the client's length, a
    4096-byte frame -- a bytearray, or for a PUT also an immutable ``bytes`` page, which is
    stored without a copy -- an existing pool, an enabled host) is answered here; anything
    else, and every case this path does not recognize, goes to ``Hypercall._run_general``
    (full validation, same counters). What it needs per call is bound once as closure
    cells, the cheapest lookups CPython has: the guest's FUSE read path makes two of these
    calls per tmem hit.
    """
    host = hypercall.host
    acquire, release = host.lock.acquire, host.lock.release
    clients_get = host.clients.get
    head_v1, head_v0 = _HEAD_V1.unpack_from, _HEAD_V0.unpack_from
    general, failed = hypercall._run_general, hypercall._failed

    def do_tmem_op(client_id: int, op: bytes, page: bytearray | memoryview | None = None) -> int:
        acquire()
        try:
            client = clients_get(client_id) if type(client_id) is int else None
            frame = type(page)
            if (
                client is None or type(op) is not bytes or (frame is not bytearray and frame is not bytes)
                or len(op) != client.record_size or len(page) != PAGE_SIZE or not host.enabled
            ):
                return general(client_id, op, page)
            if len(op) == V1_SIZE:
                cmd, pool_id, oid, w1, w2, index = head_v1(op)
                if w1 or w2:
                    oid |= w1 << 64 | w2 << 128
                oid_limit = OID_MAX
            else:
                cmd, pool_id, oid, index = head_v0(op)
                oid_limit = V0_OID_MAX
            pool = client.pools[pool_id] if pool_id < MAX_POOLS_PER_DOMAIN else None
            if pool is None:
                return general(client_id, op, page)
            try:
                if cmd == TMEM_PUT_PAGE and oid < oid_limit:
                    hypercall.total_tmem_ops += 1
                    # A bytearray frame is copied (the guest reuses it); an immutable bytes frame is
                    # kept as is: it cannot change, so holding it is the same as holding a copy.
                    pool.put(client, oid, index, page if frame is bytes else bytes(page))
                    return 1
                if cmd == TMEM_GET_PAGE and pool.npages and frame is bytearray:
                    hypercall.total_tmem_ops += 1
                    got = pool.get(client, oid, index)
                    if got is None:
                        return 0
                    memoryview(page)[:] = got  # (measured faster than ``page[:] = got``)
                    return 1
            except TmemError as exc:
                hypercall.errored_tmem_ops += 1
                return failed(exc)
            return general(client_id, op, page)
        finally:
            release()

    return do_tmem_op


class Hypercall:
    """Decodes records and dispatches them; owns the op counters (Xen names)."""

    def __init__(self, host: "Tmem") -> None:
        self.host = host
        self.lock = host.lock
        self.total_tmem_ops = 0
        self.errored_tmem_ops = 0
        self.failed_copies = 0
        self.record_sizes = frozenset(V1_SIZE if v == 1 else V0_SIZE for v in host.accepted_versions)

    def do_tmem_op(self, client_id: int, op: bytes, page: bytearray | memoryview | None = None) -> int:
        """The general entry: takes the host lock once, dispatches any record, turns a
        ``TmemError`` into ``-errno``. ``Tmem.do_tmem_op`` is ``fast_entry(self)``, which
        answers full-page PUT/GET itself and hands everything else to ``_run_general``."""
        self.lock.acquire()
        try:
            return self._run_general(client_id, op, page)
        finally:
            self.lock.release()

    def _run_general(self, client_id: int, op: bytes, page: bytearray | memoryview | None) -> int:
        """One op under the (already held) lock: counters and the TmemError -> -errno rule."""
        self.total_tmem_ops += 1
        try:
            rc = self._dispatch_general(client_id, op, page)
        except TmemError as exc:
            rc = self._failed(exc)
        if rc < 0:
            self.errored_tmem_ops += 1
        return rc

    def _failed(self, exc: TmemError) -> int:
        if isinstance(exc, BadAddress):
            self.failed_copies += 1
        return -exc.errno

    # --- dispatch ---------------------------------------------------------------------------------

    def _dispatch_general(self, client_id: int, op: bytes, page: bytearray | memoryview | None) -> int:
        if not self.host.enabled:
            raise NoDevice("tmem is not enabled on this host")
        if not isinstance(op, (bytes, bytearray, memoryview)):
            raise BadAddress(f"a tmem_op record is a bytes-like object, got {type(op).__name__}")
        op = bytes(op)  # a snapshot of the guest's record (and raw bytes whatever the view's format)
        size = len(op)
        if size != V1_SIZE and size != V0_SIZE:
            raise BadAddress(f"a tmem_op record is 56 (v1) or 40 (v0) bytes, got {size}")
        host = self.host
        client = host.clients.get(client_id) if type(client_id) is int else None
        if client is None and not (type(client_id) is int and 0 <= client_id < CLI_ID_NULL):
            raise InvalidArgument(f"client id must be in 0..{CLI_ID_NULL - 1}, got {client_id!r}")
        (cmd,) = _CMD.unpack_from(op)
        if cmd == TMEM_CONTROL:
            if client_id != 0:
                raise NotPermitted("TMEM_CONTROL is for the control domain (client 0) only")
            return host.control.dispatch(op, page)
        if cmd == TMEM_NEW_POOL or cmd == TMEM_AUTH or cmd == TMEM_RESTORE_NEW:
            return self._creat(client_id, client, cmd, op)
        if cmd not in GEN_CMDS:
            raise NotImplementedOp(f"unknown tmem command {cmd}")
        expected = client.record_size if client is not None else 0
        if not expected:
            if size not in self.record_sizes:
                raise BadAddress(f"a {size}-byte record is not a layout this host accepts")
        elif size != expected:
            raise BadAddress(f"client {client_id} uses {expected}-byte records, got {size}")
        if size == V1_SIZE:
            _, pool_id, w0, w1, w2, index, toff, poff, length, _cmfn = _GEN_V1.unpack(op)
            oid = w0 | w1 << 64 | w2 << 128
            oid_limit = OID_MAX
        else:
            _, pool_id, oid, index, toff, poff, length, _cmfn = _GEN_V0.unpack(op)
            oid_limit = V0_OID_MAX
        if not 0 <= pool_id < MAX_POOLS_PER_DOMAIN:
            raise NoDevice(f"pool id {pool_id} out of range")
        if client is None:  # a client exists once it has made a pool; before that, no pool ids
            if cmd == TMEM_DESTROY_POOL:
                return 0
            raise NoDevice(f"client {client_id} has no pools")
        pool = client.pools[pool_id]
        if cmd == TMEM_DESTROY_POOL:
            return 1 if pool is not None and client.destroy_pool(pool_id) else 0
        if pool is None:
            raise NoDevice(f"client {client_id} has no pool {pool_id}")
        if cmd == TMEM_PUT_PAGE:
            data = _read_page(page)
            _check_oid(oid, oid_limit)
            pool.put(client, oid, index, data)
            return 1
        if cmd == TMEM_GET_PAGE:
            _check_writable(page)
            if not pool.npages:
                raise Empty(f"pool {pool_id} holds no pages")
            got = pool.get(client, oid, index)
            if got is None:
                return 0
            page[:] = got  # type: ignore[index]
            return 1
        if cmd == TMEM_FLUSH_PAGE:
            pool.flush_page(oid, index)
            return _flush_rc(pool)
        if cmd == TMEM_FLUSH_OBJECT:
            pool.flush_object(oid)
            return _flush_rc(pool)
        if cmd == TMEM_NEW_PAGE:
            _check_oid(oid, oid_limit)
            pool.put(client, oid, index, ZERO_PAGE)
            return 1
        if cmd == TMEM_READ:
            return self._read(client, pool, oid, index, toff, poff, length, page)
        if cmd == TMEM_WRITE:
            _check_oid(oid, oid_limit)
            return self._write(client, pool, oid, index, toff, poff, length, page)
        return 0  # TMEM_XCHG: "not implemented", 0 (Xen 4.1)

    def _creat(self, client_id: int, client: "Client | None", cmd: int, op: bytes) -> int:
        layout = _CREAT_V1 if len(op) == V1_SIZE else _CREAT_V0
        _, pool_id, uuid_lo, uuid_hi, flags, arg1 = layout.unpack(op)
        if cmd == TMEM_NEW_POOL:
            if client is None:  # registered only if the pool is made (failed ops leave no trace)
                return self.host.adopt_client(client_id, lambda c: c.create_pool(flags, (uuid_lo, uuid_hi)))
            return client.create_pool(flags, (uuid_lo, uuid_hi))
        if client_id != 0:
            raise NotPermitted("TMEM_AUTH and TMEM_RESTORE_NEW are for the control domain (client 0) only")
        if cmd == TMEM_AUTH:
            return self.host.control.authorize(arg1, (uuid_lo, uuid_hi), flags != 0)
        target = self.host.existing_client(arg1)  # RESTORE_NEW: the client RESTORE_BEGIN made
        return target.create_pool(flags, (uuid_lo, uuid_hi), pool_id=pool_id)

    # --- partial page ops -------------------------------------------------------------------------

    def _read(self, client: "Client", pool: "TmemPool", oid: int, index: int,
              toff: int, poff: int, length: int, page: bytearray | memoryview | None) -> int:
        _check_writable(page)
        _check_range(toff, poff, length)
        if not pool.npages:
            raise Empty("pool holds no pages")
        got = pool.get(client, oid, index)
        if got is None:
            return 0
        page[poff:poff + length] = got[toff:toff + length]  # type: ignore[index]
        return 1

    def _write(self, client: "Client", pool: "TmemPool", oid: int, index: int,
               toff: int, poff: int, length: int, page: bytearray | memoryview | None) -> int:
        source = _read_page(page)
        _check_range(toff, poff, length)
        # The new page is the old one (or zeros) with the range replaced (Xen leaves the rest
        # undefined; we keep the old bytes, which is what a partial write means).
        base = pool.peek(oid, index) or ZERO_PAGE
        data = base[:toff] + source[poff:poff + length] + base[toff + length:]
        pool.put(client, oid, index, data)
        return 1


def _flush_rc(pool: "TmemPool") -> int:
    """Xen performs a flush for a frozen client but still answers -EFROZEN."""
    return -EFROZEN if pool.client.frozen else 1


def _check_oid(oid: int, limit: int) -> None:
    if oid >= limit:
        raise InvalidArgument("the all-ones oid is the save-stream terminator and cannot be stored")


def _check_range(toff: int, poff: int, length: int) -> None:
    if toff + length > PAGE_SIZE or poff + length > PAGE_SIZE:
        raise BadAddress(f"range tmem_offset={toff} pfn_offset={poff} len={length} leaves the page")


def _read_page(page: bytearray | memoryview | bytes | None) -> bytes:
    """The caller's frame as bytes (a copy: the guest may reuse its buffer; immutable bytes are kept)."""
    if type(page) is bytes and len(page) == PAGE_SIZE:
        return page
    if type(page) is bytearray and len(page) == PAGE_SIZE:
        return bytes(page)
    if isinstance(page, (bytes, bytearray, memoryview)):
        view = memoryview(page)
        if view.nbytes == PAGE_SIZE and view.c_contiguous:
            return view.tobytes()
    raise BadAddress(f"the page buffer must be {PAGE_SIZE} contiguous bytes")


def _check_writable(page: bytearray | memoryview | None) -> None:
    if type(page) is bytearray and len(page) == PAGE_SIZE:
        return
    if isinstance(page, memoryview) and not page.readonly and page.nbytes == PAGE_SIZE and page.c_contiguous \
            and page.format == "B" and page.ndim == 1:
        return
    raise BadAddress(f"the page buffer must be a writable {PAGE_SIZE}-byte bytearray or memoryview")
