"""TMEM_CONTROL sub-ops (abi.TMEMC_*) and the shared-pool authorization op, with the
semantics of tmem-abi.md §4 (Xen 4.1, with the 4.3 save/restore fixes X-SRFIX1/2).

``Control.dispatch`` decodes a control record and its ``buf`` (the caller's bytearray);
the other methods are the operations themselves, also used by Tmem's Pythonic API.
"No such client/pool" raises NotPermitted, whose errno (1) gives Xen's -1.
"""

from __future__ import annotations

import errno
import io
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import abi
from .abi import (
    CLI_ID_NULL,
    HANDLE_V0,
    HANDLE_V1,
    MAX_POOLS_PER_DOMAIN,
    PAGE_SIZE,
    TMEM_CLIENT_COMPRESS,
    TMEM_CLIENT_FROZEN,
    TMEMC_DESTROY,
    TMEMC_FLUSH,
    TMEMC_FREEZE,
    TMEMC_LIST,
    TMEMC_QUERY_FREEABLE_MB,
    TMEMC_RESTORE_BEGIN,
    TMEMC_RESTORE_FLUSH_PAGE,
    TMEMC_RESTORE_PUT_PAGE,
    TMEMC_RESTORE_STREAM_ABORT,
    TMEMC_RESTORE_STREAM_BEGIN,
    TMEMC_RESTORE_STREAM_COMMIT,
    TMEMC_RESTORE_STREAM_DATA,
    TMEMC_SAVE_BEGIN,
    TMEMC_SAVE_END,
    TMEMC_SAVE_GET_CLIENT_CAP,
    TMEMC_SAVE_GET_CLIENT_FLAGS,
    TMEMC_SAVE_GET_CLIENT_WEIGHT,
    TMEMC_SAVE_GET_MAXPOOLS,
    TMEMC_SAVE_GET_NEXT_INV,
    TMEMC_SAVE_GET_NEXT_PAGE,
    TMEMC_SAVE_GET_POOL_FLAGS,
    TMEMC_SAVE_GET_POOL_NPAGES,
    TMEMC_SAVE_GET_POOL_UUID,
    TMEMC_SAVE_GET_VERSION,
    TMEMC_SET_CAP,
    TMEMC_SET_COMPRESS,
    TMEMC_SET_WEIGHT,
    TMEMC_THAW,
)
from .client import EMPTY_AUTH_TABLE, EMPTY_UUID, grant
from .errors import EFROZEN, BadAddress, InvalidArgument, NoMemory, NotPermitted, StreamError
from .oid import OID_MAX, V0_OID_MAX, WORD_MASK

if TYPE_CHECKING:
    from .client import Client
    from .pool import TmemPool
    from .tmem import Tmem

_CTRL_V1: struct.Struct = abi.CTRL_V1  # layouts live in abi.py
_CTRL_V0: struct.Struct = abi.CTRL_V0
U32_MAX = 0xFFFFFFFF
UUID_PAIR = struct.Struct("<QQ")


class Control:
    """The control plane of one host."""

    def __init__(self, host: "Tmem") -> None:
        self.host = host
        self.uploads = RestoreUploads(upload_limit(host.memory_pages))

    # --- record decoding ----------------------------------------------------------------------

    def dispatch(self, op: bytes, buf: bytearray | memoryview | None) -> int:
        host = self.host
        if len(op) not in host.hypercall.record_sizes:
            raise BadAddress(f"a {len(op)}-byte control record is not a layout this host accepts")
        if len(op) == _CTRL_V1.size:
            _, pool_id, subop, cli_id, arg1, arg2, w0, w1, w2, _buf = _CTRL_V1.unpack(op)
            oid = w0 | w1 << 64 | w2 << 128
        else:
            _, pool_id, subop, cli_id, arg1, arg2, oid, _buf = _CTRL_V0.unpack(op)
        if subop in (TMEMC_THAW, TMEMC_FREEZE, TMEMC_DESTROY):
            self.freeze(None if cli_id == CLI_ID_NULL else cli_id, subop == TMEMC_FREEZE)
            return 0
        if subop == TMEMC_FLUSH:
            return self.flush(cli_id, arg1)
        if subop == TMEMC_LIST:
            return self.list_into(cli_id, buf, arg1, bool(arg2))
        if subop == TMEMC_SET_WEIGHT:
            self.set_weight(None if cli_id == CLI_ID_NULL else cli_id, arg1)
            return 0
        if subop == TMEMC_SET_CAP:
            self.set_cap(None if cli_id == CLI_ID_NULL else cli_id, arg1)
            return 0
        if subop == TMEMC_SET_COMPRESS:
            self.set_compress(None if cli_id == CLI_ID_NULL else cli_id, arg1 != 0)
            return 0
        if subop == TMEMC_QUERY_FREEABLE_MB:
            return self.query_freeable_mb()
        if subop == TMEMC_RESTORE_BEGIN:
            return self.restore_begin(cli_id)
        if subop == TMEMC_SAVE_BEGIN:
            return self.save_begin(cli_id, arg1 != 0)
        if subop == TMEMC_SAVE_GET_VERSION:
            client = host.clients.get(cli_id)
            return host.spec_version if client is None or client.version is None else client.version
        if subop == TMEMC_SAVE_GET_MAXPOOLS:
            return MAX_POOLS_PER_DOMAIN
        if subop == TMEMC_SAVE_GET_CLIENT_WEIGHT:
            return host.existing_client(cli_id).weight
        if subop == TMEMC_SAVE_GET_CLIENT_CAP:
            return host.existing_client(cli_id).cap
        if subop == TMEMC_SAVE_GET_CLIENT_FLAGS:
            client = host.existing_client(cli_id)
            return (TMEM_CLIENT_COMPRESS if client.compress else 0) | (TMEM_CLIENT_FROZEN if client.was_frozen else 0)
        if subop == TMEMC_SAVE_GET_POOL_FLAGS:
            client, pool = self._pool(cli_id, pool_id)
            return pool.flags(_version(client))
        if subop == TMEMC_SAVE_GET_POOL_NPAGES:
            return self._pool(cli_id, pool_id)[1].npages
        if subop == TMEMC_SAVE_GET_POOL_UUID:
            pool = self._pool(cli_id, pool_id)[1]
            _writable(buf, UUID_PAIR.size)
            UUID_PAIR.pack_into(buf, 0, *pool.uuid)  # type: ignore[arg-type]
            return 0  # and, unlike Xen 4.0-4.2, no fall-through into SAVE_END (X-SRFIX1)
        if subop == TMEMC_SAVE_GET_NEXT_PAGE:
            return self.save_next_page(cli_id, pool_id, buf, arg1)
        if subop == TMEMC_SAVE_GET_NEXT_INV:
            return self.save_next_inv(cli_id, buf, arg1)
        if subop == TMEMC_SAVE_END:
            return self.save_end(cli_id)
        if subop == TMEMC_RESTORE_PUT_PAGE:
            return self.restore_put_page(cli_id, pool_id, oid, arg2, buf, arg1)
        if subop == TMEMC_RESTORE_FLUSH_PAGE:
            client, pool = self._pool(cli_id, pool_id)
            pool.flush_page(oid, arg2)
            return -EFROZEN if client.frozen else 1
        if subop == TMEMC_RESTORE_STREAM_BEGIN:
            return self.restore_stream_begin(cli_id)
        if subop == TMEMC_RESTORE_STREAM_DATA:
            return self.uploads.append(cli_id, arg2, oid, _readable(buf, arg1))
        if subop == TMEMC_RESTORE_STREAM_COMMIT:
            return self.restore_stream_commit(cli_id, arg2, arg1, oid, buf)
        if subop == TMEMC_RESTORE_STREAM_ABORT:
            return 1 if self.uploads.drop(cli_id, arg2) else 0
        raise NotPermitted(f"unknown control sub-op {subop}")  # Xen: -1

    def _pool(self, cli_id: int, pool_id: int) -> "tuple[Client, TmemPool]":
        client = self.host.existing_client(cli_id)
        pool = client.pools[pool_id] if 0 <= pool_id < MAX_POOLS_PER_DOMAIN else None
        if pool is None:
            raise NotPermitted(f"client {cli_id} has no pool {pool_id}")
        return client, pool

    def _clients(self, cli_id: int | None) -> "list[Client]":
        if cli_id is None or cli_id == CLI_ID_NULL:
            return list(self.host.clients.values())
        return [self.host.existing_client(cli_id)]

    # --- freeze, flush, variables --------------------------------------------------------------

    def freeze(self, cli_id: int | None, frozen: bool) -> None:
        for client in self._clients(cli_id):
            client.frozen = frozen

    def flush(self, cli_id: int, kib: int) -> int:
        """Relinquish ``kib`` KiB rounded up to whole pages; the KiB actually freed."""
        if cli_id != CLI_ID_NULL:
            raise NotPermitted("client-specific flush is not supported (Xen: use --all)")
        if not isinstance(kib, int) or not 0 <= kib <= U32_MAX:
            raise InvalidArgument(f"kib must be a u32, got {kib!r}")
        pages = (kib + (PAGE_SIZE // 1024) - 1) // (PAGE_SIZE // 1024)
        return self.host.relinquish(pages * PAGE_SIZE) // 1024

    def set_weight(self, cli_id: int | None, weight: int) -> None:
        _u32(weight, "weight")
        eviction = self.host.eviction
        for client in self._clients(cli_id):
            eviction.weight_total += weight - client.weight
            client.weight = weight
        eviction.weights_changed()

    def set_cap(self, cli_id: int | None, cap: int) -> None:
        _u32(cap, "cap")
        for client in self._clients(cli_id):
            client.cap = cap  # stored and reported; "currently a no-op" (X-DOC)

    def set_compress(self, cli_id: int | None, enabled: bool) -> None:
        clients = self._clients(cli_id)
        if self.host.dedup:
            raise NotPermitted("compression cannot be changed per client while dedup is on")
        for client in clients:
            client.compress = bool(enabled)

    def query_freeable_mb(self) -> int:
        """Ephemeral pages (all of them could be given back) in MiB: Xen's pages >> 8."""
        return self.host.eviction.global_eph_count >> (20 - 12)

    def authorize(self, cli_id: int, uuid: tuple[int, int], auth: bool) -> int:
        """TMEM_AUTH. CLI_ID_NULL sets the global "auth satisfied" switch."""
        if cli_id == CLI_ID_NULL:
            self.host.global_shared_auth = auth
            return 1
        client = self.host.clients.get(cli_id)
        if client is not None:
            return client.authorize(uuid, auth)
        if not self.host.shared_auth_strict or not 0 <= cli_id < CLI_ID_NULL:
            raise InvalidArgument(f"no tmem client {cli_id}")  # Xen: the domain must exist
        table = list(self.host.pending_auth.get(cli_id, EMPTY_AUTH_TABLE))
        done = grant(table, cli_id, uuid, auth)
        if any(entry != EMPTY_UUID for entry in table):
            self.host.pending_auth[cli_id] = table
        else:
            self.host.pending_auth.pop(cli_id, None)
        return done

    # --- list -----------------------------------------------------------------------------------

    def list_into(self, cli_id: int, buf: bytearray | memoryview | None, length: int, long: bool) -> int:
        from .stats import list_text

        if cli_id != CLI_ID_NULL:
            self.host.existing_client(cli_id)
        _writable(buf, length)
        lines = list_text(self.host, cli_id, long).splitlines(keepends=True)
        out = bytearray()
        for line in lines:  # Xen stops at the first record that does not fit (NUL included)
            raw = line.encode()
            if len(out) + len(raw) >= length:
                break
            out += raw
        if length:
            out.append(0)
            buf[: len(out)] = out  # type: ignore[index]
        return 0

    # --- save -----------------------------------------------------------------------------------

    def save_begin(self, cli_id: int, live: bool) -> int:
        client = self.host.clients.get(cli_id)
        if client is None or not any(client.pools):
            return 0
        client.was_frozen = client.frozen
        client.frozen = True
        client.live_migrating = live
        self._reset_cursors(client)
        return 1

    def save_end(self, cli_id: int) -> int:
        client = self.host.existing_client(cli_id)
        client.live_migrating = False
        client.invalidated.clear()
        client.frozen = client.was_frozen
        self._reset_cursors(client)
        return 0

    @staticmethod
    def _reset_cursors(client: "Client") -> None:
        client.inv_cursor = 0
        for pool in client.pools:
            if pool is not None:
                pool.save_cursor = None

    def save_next_page(self, cli_id: int, pool_id: int, buf: bytearray | memoryview | None, bufsize: int) -> int:
        client = self.host.clients.get(cli_id)
        pool = client.pools[pool_id] if client is not None and 0 <= pool_id < MAX_POOLS_PER_DOMAIN else None
        if client is None or pool is None or not pool.persistent:
            return -1
        version = _version(client)
        handle = HANDLE_V1 if version == 1 else HANDLE_V0
        if bufsize < handle.size + PAGE_SIZE:
            raise NoMemory(f"buffer of {bufsize} bytes cannot hold a handle and a page")
        _writable(buf, handle.size + PAGE_SIZE)
        node = pool.next_saved_page()
        if node is None:
            return -1
        _, _, oid, index = node[:4]
        _pack_handle(handle, buf, 0, index, oid)  # pool_id not filled (as Xen)
        data = pool.get(client, oid, index)
        assert data is not None, "a listed persistent page must be readable"
        buf[handle.size : handle.size + PAGE_SIZE] = data  # type: ignore[index]
        return 1

    def save_next_inv(self, cli_id: int, buf: bytearray | memoryview | None, bufsize: int) -> int:
        client = self.host.clients.get(cli_id)
        if client is None:
            return 0
        handle = HANDLE_V1 if _version(client) == 1 else HANDLE_V0
        if bufsize < handle.size:
            return 0
        _writable(buf, handle.size)
        if client.inv_cursor >= len(client.invalidated):
            client.inv_cursor = 0
            return 0
        pool_id, oid, index = client.invalidated[client.inv_cursor]
        client.inv_cursor += 1
        _pack_handle(handle, buf, pool_id, index, oid)
        return 1

    # --- restore --------------------------------------------------------------------------------

    def restore_begin(self, cli_id: int) -> int:
        host = self.host
        if cli_id in host.clients or not 0 <= cli_id < CLI_ID_NULL:
            return -1
        host.client(cli_id)
        return 1

    def restore_put_page(
        self, cli_id: int, pool_id: int, oid: int, index: int, buf: bytearray | memoryview | None, length: int
    ) -> int:
        client, pool = self._pool(cli_id, pool_id)
        if length != PAGE_SIZE:
            raise BadAddress(f"RESTORE_PUT_PAGE carries a whole page ({PAGE_SIZE} bytes), got arg1={length}")
        if not isinstance(buf, (bytes, bytearray, memoryview)) or memoryview(buf).nbytes < length:
            raise BadAddress("RESTORE_PUT_PAGE buffer missing or shorter than arg1")
        if oid >= (V0_OID_MAX if _version(client) == 0 else OID_MAX):
            raise InvalidArgument("the all-ones oid is the save-stream terminator and cannot be stored")
        pool.put(client, oid, index, memoryview(buf).cast("B")[:length].tobytes())
        return 1

    # --- restore of a whole stream (tmemd extension, see abi.TMEMC_RESTORE_STREAM_*) ----------

    def restore_stream_begin(self, cli_id: int) -> int:
        """A new upload for ``cli_id``: its token, or -EEXIST when the client exists already (the
        commit would refuse it; saying so now spares sending the stream)."""
        if not 0 <= cli_id < CLI_ID_NULL:
            raise InvalidArgument(f"client id must be in 0..{CLI_ID_NULL - 1}, got {cli_id}")
        if cli_id in self.host.clients:
            return -errno.EEXIST
        return self.uploads.begin(cli_id)

    def restore_stream_commit(
        self, cli_id: int, token: int, flags: int, length: int, buf: bytearray | memoryview | None
    ) -> int:
        """Restore the uploaded stream as one transaction (``Tmem.restore``: all or nothing); 1, or
        -EINVAL with the one-line reason written NUL-terminated into ``buf`` (if one is given)."""
        if flags & ~abi.RESTORE_STREAM_CONVERT:
            raise InvalidArgument(f"unknown restore flags {flags:#x}")
        data = self.uploads.take(cli_id, token)  # consumed whatever happens next
        try:
            if len(data) != length:
                raise StreamError(f"the upload holds {len(data)} bytes but the commit says {length}: "
                                  "a chunk was lost, nothing restored")
            self.host.restore(cli_id, io.BytesIO(data), convert=bool(flags & abi.RESTORE_STREAM_CONVERT))
        except StreamError as exc:
            _write_message(buf, str(exc))
            return -exc.errno
        return 1


def upload_limit(memory_pages: int) -> int:
    """The most stream bytes this host stages: a restore cannot bring back more persistent pages than
    the budget holds, so a larger stream could only fail after costing that memory. Per page a
    record is its data plus at most 28 bytes of handle; 1 MiB covers headers and the extra section."""
    return memory_pages * (PAGE_SIZE + 64) + (1 << 20)


@dataclass
class Upload:
    token: int
    data: bytearray = field(default_factory=bytearray)


class RestoreUploads:
    """Streams being uploaded for a restore, one per target client, within ``limit`` bytes in all.

    The control plane does not see connections, so an upload whose tool died is only dropped when
    a new upload for that client begins, or when room is needed (oldest first, never the upload
    being appended to). A token names each upload so a stale tool cannot add to a newer one."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[int, Upload] = {}  # insertion order = age
        self._last_token = 0

    def begin(self, cli_id: int) -> int:
        self._open.pop(cli_id, None)
        self._last_token = self._last_token % 0x7FFFFFFF + 1  # a positive s32: it is a return code
        self._open[cli_id] = Upload(self._last_token)
        return self._last_token

    def append(self, cli_id: int, token: int, offset: int, chunk: bytes) -> int:
        upload = self._get(cli_id, token)
        if offset != len(upload.data):
            raise InvalidArgument(f"chunk at offset {offset}, but the upload holds {len(upload.data)} bytes")
        others = sum(len(u.data) for c, u in self._open.items() if c != cli_id)
        if len(upload.data) + len(chunk) > self.limit:
            raise NoMemory(f"a stream of more than {self.limit} bytes cannot restore on this host")
        for stale in [c for c in self._open if c != cli_id]:  # oldest first
            if others + len(upload.data) + len(chunk) <= self.limit:
                break
            others -= len(self._open.pop(stale).data)
        upload.data += chunk
        return 1

    def take(self, cli_id: int, token: int) -> bytearray:
        """The upload's bytes, no longer staged (no copy: nothing else holds them)."""
        data = self._get(cli_id, token).data
        del self._open[cli_id]
        return data

    def drop(self, cli_id: int, token: int) -> bool:
        upload = self._open.get(cli_id)
        if upload is None or upload.token != token:
            return False
        del self._open[cli_id]
        return True

    def staged_bytes(self) -> int:
        return sum(len(u.data) for u in self._open.values())

    def _get(self, cli_id: int, token: int) -> Upload:
        upload = self._open.get(cli_id)
        if upload is None or upload.token != token:
            raise NotPermitted(f"no restore upload {token} for client {cli_id}")  # Xen's -1
        return upload

    def check(self) -> None:
        assert self.staged_bytes() <= self.limit, "restore uploads exceed their limit"
        assert all(1 <= u.token <= 0x7FFFFFFF for u in self._open.values())


def _readable(buf: bytearray | memoryview | None, length: int) -> bytes:
    """The first ``length`` bytes of a control buffer (-EFAULT if it has fewer)."""
    if not isinstance(buf, (bytes, bytearray, memoryview)) or memoryview(buf).nbytes < length:
        raise BadAddress(f"control buffer missing or shorter than arg1={length}")
    return memoryview(buf).cast("B")[:length].tobytes()


def _write_message(buf: bytearray | memoryview | None, message: str) -> None:
    """``message`` NUL-terminated into a writable control buffer, cut to fit; nothing without one."""
    if buf is None or (isinstance(buf, memoryview) and buf.readonly) or not isinstance(buf, (bytearray, memoryview)):
        return
    size = memoryview(buf).nbytes
    if size:
        raw = message.encode("utf-8", "replace")[: size - 1] + b"\0"
        memoryview(buf).cast("B")[: len(raw)] = raw


def _version(client: "Client") -> int:
    return client.version if client.version is not None else client.host.spec_version


def _pack_handle(handle: struct.Struct, buf: bytearray | memoryview | None, pool_id: int, index: int, oid: int) -> None:
    if handle is HANDLE_V1:
        handle.pack_into(buf, 0, pool_id, index, oid & WORD_MASK, (oid >> 64) & WORD_MASK, oid >> 128)  # type: ignore[arg-type]
    else:
        handle.pack_into(buf, 0, pool_id, index, oid)  # type: ignore[arg-type]


def _writable(buf: bytearray | memoryview | None, size: int) -> None:
    if isinstance(buf, bytearray) and len(buf) >= size:
        return
    if isinstance(buf, memoryview) and not buf.readonly and buf.nbytes >= size and buf.format == "B" and buf.ndim == 1:
        return
    raise BadAddress(f"control buffer must be a writable bytearray of at least {size} bytes")


def _u32(value: int, name: str) -> None:
    if not isinstance(value, int) or not 0 <= value <= U32_MAX:
        raise InvalidArgument(f"{name} must be a u32, got {value!r}")
