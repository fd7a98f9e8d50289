"""The libxc tmem save/restore stream (``xc_tmem_save`` / ``xc_tmem_restore``), v0 and v1.

Three layers, each usable alone:

* a pure data model: ``ClientImage`` holding ``PoolImage`` s (what one client's tmem looks
  like in a save image);
* a codec: ``write_stream`` / ``read_stream`` (byte-exact framing of tmem-abi.md §5, see
  docs/stream-format.md) and ``convert`` (v0 <-> v1);
* the host drivers ``save_client`` / ``restore_client``, which talk to a host ONLY through
  ``do_tmem_op(0, <TMEM_CONTROL or TMEM_RESTORE_NEW record>, buf)``, as libxc does, plus
  ``destroy_client`` to roll back a failed restore.

The one documented error is ``StreamError`` (one-line message; framing errors name the byte
offset from the start of the stream, i.e. from the -5 marker).

Deviations from Xen 4.1 (all deliberate, all documented in docs/stream-format.md):
restore checks the stream version against the host (Xen has a FIXME and fails later, or
misframes); restore applies the SAVED weight and cap (4.0/4.1 passed 0); restore freezes the
client only after its pages are back (Xen froze first, so a frozen client's pages came back
as -EFROZEN); pool flags without version bits (4.1/4.2 streams, X-SRFIX2) are restored with
the stream's version; a non-live save also ends with SAVE_END so the source client is not
left frozen.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import BinaryIO, Protocol

from . import abi
from .errors import StreamError, TmemError
from .oid import INVALID_OID, V0_OID_MAX, Oid

# --- stream field layouts (the stream's own; records and handles live in abi.py) ---------
_S32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
_UUID = struct.Struct("<QQ")
_CLIENT_HEADER = struct.Struct("<IIIIIII")  # version, max_pools, -1, flags, weight, cap, -1
_POOL_HEADER = struct.Struct("<IIQQ")  # after the u32 pool_id: flags, n_pages, uuid[0], uuid[1]

SEPARATOR = 0xFFFFFFFF
OID_SIZE = {abi.SPEC_V1: 24, abi.SPEC_V0: 8}
TERMINATOR_OID = {abi.SPEC_V1: int(INVALID_OID), abi.SPEC_V0: V0_OID_MAX}
CLIENT_FLAG_BITS = abi.TMEM_CLIENT_COMPRESS | abi.TMEM_CLIENT_FROZEN

PageRecord = tuple[Oid, int, bytes]  # (oid, index, page data)
Handle = tuple[int, Oid, int]  # (pool_id, oid, index) of an invalidated persistent page


# ===================================================================== data model


@dataclass
class PoolImage:
    """One pool as saved: its slot, NEW_POOL flags, page count and (persistent) pages.

    ``n_pages`` is what the source reported; ``pages`` may be shorter when the pool shrank
    while saving (the stream then carries an all-ones-oid terminator).
    """

    pool_id: int
    flags: int
    n_pages: int
    uuid: tuple[int, int] = (0, 0)
    pages: list[PageRecord] = field(default_factory=list)

    @property
    def persistent(self) -> bool:
        return bool(self.flags & abi.TMEM_POOL_PERSIST)

    @property
    def shared(self) -> bool:
        return bool(self.flags & abi.TMEM_POOL_SHARED)

    @property
    def kind(self) -> str:
        """e.g. "persistent/private" (Xen's LIST ``PT`` says the same as ``PP``)."""
        return f"{'persistent' if self.persistent else 'ephemeral'}/{'shared' if self.shared else 'private'}"

    @property
    def page_size(self) -> int:
        return abi.flags_pagesize(self.flags)

    @property
    def stream_n_pages(self) -> int:
        """The n_pages the stream carries: forced to 0 for ephemeral pools (never saved)."""
        return self.n_pages if self.persistent else 0

    @property
    def terminated(self) -> bool:
        """True when the page list ran out early, so the stream carries a terminator oid."""
        return len(self.pages) < self.stream_n_pages


@dataclass
class ClientImage:
    """One client's tmem state as carried by a save stream.

    ``invalidated`` is None for a non-live save (no extra section), else the handles of
    persistent pages flushed while the live save ran (the -6 extra section).
    """

    version: int
    max_pools: int = abi.MAX_POOLS_PER_DOMAIN
    flags: int = 0
    weight: int = 0
    cap: int = 0
    pools: list[PoolImage] = field(default_factory=list)
    invalidated: list[Handle] | None = None

    @property
    def frozen(self) -> bool:
        return bool(self.flags & abi.TMEM_CLIENT_FROZEN)

    @property
    def compress(self) -> bool:
        return bool(self.flags & abi.TMEM_CLIENT_COMPRESS)

    def pool(self, pool_id: int) -> PoolImage | None:
        return next((p for p in self.pools if p.pool_id == pool_id), None)

    def check(self) -> None:
        """Raise StreamError unless this image can be written as a stream of its version."""
        problem = _image_problem(self)
        if problem:
            raise StreamError(f"invalid client image: {problem}")


def _image_problem(image: ClientImage) -> str | None:
    """The first reason ``image`` cannot be framed, or None. Shared by writer and reader."""
    if image.version not in abi.SPEC_VERSIONS:
        return f"version {image.version} is neither 0 nor 1"
    if not 1 <= image.max_pools <= abi.MAX_POOLS_PER_DOMAIN:
        return f"max_pools {image.max_pools} is not in 1..{abi.MAX_POOLS_PER_DOMAIN}"
    if image.flags & ~CLIENT_FLAG_BITS:
        return f"client flags {image.flags:#x} have bits other than compress/frozen"
    for name in ("weight", "cap"):
        if not 0 <= getattr(image, name) <= 0xFFFFFFFF:
            return f"{name} {getattr(image, name)} is not a u32"
    previous = -1
    for pool in image.pools:
        problem = _pool_problem(pool, image.version, image.max_pools, previous)
        if problem:
            return problem
        previous = pool.pool_id
    for pool_id, oid, index in image.invalidated or ():
        pool = image.pool(pool_id)
        if pool is None:
            return f"invalidated handle names pool {pool_id}, which the stream does not carry"
        problem = _handle_problem(oid, index, image.version, terminator_allowed=True)
        if problem:
            return f"invalidated handle in pool {pool_id}: {problem}"
    return None


def _pool_problem(pool: PoolImage, version: int, max_pools: int, previous: int) -> str | None:
    if not previous < pool.pool_id < max_pools:
        return f"pool id {pool.pool_id} is not ascending and below max_pools {max_pools}"
    if pool.page_size != abi.PAGE_SIZE:
        return f"pool {pool.pool_id}: page size {pool.page_size} is not {abi.PAGE_SIZE}"
    flags_version = abi.flags_version(pool.flags)
    if flags_version not in (0, version):
        # 0 is allowed: Xen 4.1/4.2 never put version bits in SAVE_GET_POOL_FLAGS (X-SRFIX2).
        return f"pool {pool.pool_id}: flags carry spec version {flags_version} in a v{version} stream"
    if not 0 <= pool.n_pages <= 0xFFFFFFFF:
        return f"pool {pool.pool_id}: n_pages {pool.n_pages} is not a u32"
    if not all(0 <= word <= 0xFFFFFFFFFFFFFFFF for word in pool.uuid) or len(pool.uuid) != 2:
        return f"pool {pool.pool_id}: uuid {pool.uuid} is not two u64"
    if not pool.persistent and pool.pages:
        return f"pool {pool.pool_id}: an ephemeral pool's pages are never saved"
    if len(pool.pages) > pool.stream_n_pages:
        return f"pool {pool.pool_id}: {len(pool.pages)} pages but n_pages is {pool.n_pages}"
    for oid, index, data in pool.pages:
        problem = _handle_problem(oid, index, version, terminator_allowed=False)
        if problem:
            return f"pool {pool.pool_id}: {problem}"
        if len(data) != pool.page_size:
            return f"pool {pool.pool_id}: page {index} of {oid!r} has {len(data)} bytes, not {pool.page_size}"
    return None


def _handle_problem(oid: int, index: int, version: int, *, terminator_allowed: bool) -> str | None:
    if not 0 <= index <= 0xFFFFFFFF:
        return f"index {index} is not a u32"
    if not 0 <= oid <= TERMINATOR_OID[version]:
        return f"oid {_oid_text(oid)} does not fit a v{version} stream"
    if oid == TERMINATOR_OID[version] and not terminator_allowed:
        return f"oid {_oid_text(oid)} is the v{version} terminator and cannot name a page"
    return None


def _oid_text(oid: int) -> str:
    value = int(oid)
    if 0 <= value <= int(INVALID_OID):
        return repr(Oid(value))
    return hex(value)


# ===================================================================== writer


def write_stream(image: ClientImage, fileobj: BinaryIO) -> int:
    """Write ``image`` as a stream (starting with the -5 marker); returns bytes written."""
    image.check()
    chunks = list(_stream_chunks(image))
    for chunk in chunks:
        fileobj.write(chunk)
    return sum(len(chunk) for chunk in chunks)


def encode_stream(image: ClientImage) -> bytes:
    """The stream bytes for ``image`` (``write_stream`` into memory)."""
    image.check()
    return b"".join(_stream_chunks(image))


def _stream_chunks(image: ClientImage) -> Iterator[bytes]:
    version = image.version
    yield _S32.pack(abi.XC_SAVE_ID_TMEM)
    yield _CLIENT_HEADER.pack(
        version, image.max_pools, SEPARATOR, image.flags, image.weight, image.cap, SEPARATOR
    )
    for pool in image.pools:
        yield _U32.pack(pool.pool_id) + _POOL_HEADER.pack(pool.flags, pool.stream_n_pages, *pool.uuid)
        for oid, index, data in pool.pages:
            yield _oid_bytes(oid, version) + _U32.pack(index) + bytes(data)
        if pool.terminated:
            yield _oid_bytes(TERMINATOR_OID[version], version)
    yield _U32.pack(SEPARATOR)
    if image.invalidated is not None:
        yield _S32.pack(abi.XC_SAVE_ID_TMEM_EXTRA)
        for pool_id, oid, index in image.invalidated:
            yield _U32.pack(pool_id) + _oid_bytes(oid, version) + _U32.pack(index)
        yield _U32.pack(SEPARATOR)


def _oid_bytes(oid: int, version: int) -> bytes:
    return int(oid).to_bytes(OID_SIZE[version], "little")


# ===================================================================== reader


class _Reader:
    """Exact reads from a file object, tracking the offset for error messages."""

    def __init__(self, fileobj: BinaryIO) -> None:
        self._file = fileobj
        self.offset = 0

    def read(self, size: int, what: str) -> bytes:
        data = self._file.read(size)
        if data is None or len(data) != size:
            got = 0 if data is None else len(data)
            raise StreamError(f"truncated stream at offset {self.offset}: {what} needs {size} bytes, got {got}")
        self.offset += size
        return data

    def unpack(self, layout: struct.Struct, what: str) -> tuple:
        return layout.unpack(self.read(layout.size, what))

    def read_optional(self, size: int) -> bytes:
        """Up to ``size`` bytes; b"" at a clean end of stream."""
        data = self._file.read(size) or b""
        self.offset += len(data)
        return data

    def fail(self, at: int, message: str) -> StreamError:
        return StreamError(f"bad stream at offset {at}: {message}")


def read_stream(fileobj: BinaryIO) -> ClientImage:
    """Parse a whole stream (marker -5 first, optional -6 extra section, then end of file).

    Everything is validated before returning, so callers can act on the image knowing the
    stream is well formed. Raises StreamError naming the offset of the first problem.
    """
    reader = _Reader(fileobj)
    (marker,) = reader.unpack(_S32, "the tmem marker")
    if marker != abi.XC_SAVE_ID_TMEM:
        raise reader.fail(0, f"marker is {marker}, expected {abi.XC_SAVE_ID_TMEM} (XC_SAVE_ID_TMEM)")
    image = _read_client_header(reader)
    image.pools = _read_pools(reader, image)
    image.invalidated = _read_extra_section(reader, image)
    problem = _image_problem(image)
    if problem:  # everything is checked field by field above; this is the belt to those braces
        raise reader.fail(reader.offset, problem)
    return image


def decode_stream(data: bytes) -> ClientImage:
    return read_stream(io.BytesIO(data))


def _read_client_header(reader: _Reader) -> ClientImage:
    at = reader.offset
    version, max_pools, sep1, flags, weight, cap, sep2 = reader.unpack(_CLIENT_HEADER, "the client header")
    if version not in abi.SPEC_VERSIONS:
        raise reader.fail(at, f"version {version} is neither 0 nor 1")
    if not 1 <= max_pools <= abi.MAX_POOLS_PER_DOMAIN:
        raise reader.fail(at + 4, f"max_pools {max_pools} is not in 1..{abi.MAX_POOLS_PER_DOMAIN}")
    if sep1 != SEPARATOR:
        raise reader.fail(at + 8, f"separator is {sep1:#x}, expected 0xffffffff")
    if flags & ~CLIENT_FLAG_BITS:
        raise reader.fail(at + 12, f"client flags {flags:#x} have bits other than compress/frozen")
    if sep2 != SEPARATOR:
        # Xen reads and ignores this one; a stream we write always has it, so insist.
        raise reader.fail(at + 24, f"separator is {sep2:#x}, expected 0xffffffff")
    return ClientImage(version=version, max_pools=max_pools, flags=flags, weight=weight, cap=cap)


def _read_pools(reader: _Reader, image: ClientImage) -> list[PoolImage]:
    pools: list[PoolImage] = []
    while True:
        at = reader.offset
        (pool_id,) = reader.unpack(_U32, "a pool id or the end-of-pools separator")
        if pool_id == SEPARATOR:
            return pools
        previous = pools[-1].pool_id if pools else -1
        if not previous < pool_id < image.max_pools:
            raise reader.fail(at, f"pool id {pool_id} is not ascending and below max_pools {image.max_pools}")
        pools.append(_read_pool(reader, image.version, pool_id))


def _read_pool(reader: _Reader, version: int, pool_id: int) -> PoolImage:
    at = reader.offset
    flags, n_pages, uuid_lo, uuid_hi = reader.unpack(_POOL_HEADER, f"pool {pool_id}'s header")
    pool = PoolImage(pool_id, flags, n_pages, (uuid_lo, uuid_hi))
    if pool.page_size != abi.PAGE_SIZE:
        raise reader.fail(at, f"pool {pool_id}: page size {pool.page_size} is not {abi.PAGE_SIZE}")
    if abi.flags_version(flags) not in (0, version):
        raise reader.fail(at, f"pool {pool_id}: flags carry spec version {abi.flags_version(flags)} in a v{version} stream")
    if not pool.persistent and n_pages:
        raise reader.fail(at + 4, f"pool {pool_id} is ephemeral but n_pages is {n_pages} (must be 0)")
    for _ in range(n_pages):
        record_at = reader.offset
        oid = int.from_bytes(reader.read(OID_SIZE[version], f"an oid in pool {pool_id}"), "little")
        if oid == TERMINATOR_OID[version]:
            return pool
        (index,) = reader.unpack(_U32, f"a page index in pool {pool_id}")
        data = reader.read(pool.page_size, f"page data in pool {pool_id} (record at {record_at})")
        pool.pages.append((Oid(oid), index, data))
    return pool


def _read_extra_section(reader: _Reader, image: ClientImage) -> list[Handle] | None:
    at = reader.offset
    head = reader.read_optional(_S32.size)
    if not head:
        return None
    if len(head) != _S32.size:
        raise StreamError(f"truncated stream at offset {at}: the extra marker needs 4 bytes, got {len(head)}")
    (marker,) = _S32.unpack(head)
    if marker != abi.XC_SAVE_ID_TMEM_EXTRA:
        raise reader.fail(at, f"trailing data: {marker} is not the extra-section marker {abi.XC_SAVE_ID_TMEM_EXTRA}")
    handles: list[Handle] = []
    while True:
        at = reader.offset
        (pool_id,) = reader.unpack(_U32, "an invalidated handle's pool id or the terminator")
        if pool_id == SEPARATOR:
            break
        if image.pool(pool_id) is None:
            raise reader.fail(at, f"invalidated handle names pool {pool_id}, which the stream does not carry")
        oid = int.from_bytes(reader.read(OID_SIZE[image.version], "an invalidated handle's oid"), "little")
        (index,) = reader.unpack(_U32, "an invalidated handle's index")
        handles.append((pool_id, Oid(oid), index))
    tail_at = reader.offset
    if reader.read_optional(1):
        raise reader.fail(tail_at, "trailing data after the extra section")
    return handles


# ===================================================================== conversion


def convert(image: ClientImage, to_version: int) -> ClientImage:
    """The same client as a stream of ``to_version`` (a new image; ``image`` is untouched).

    v0 -> v1 always works: a v0 oid n is the v1 oid (n, 0, 0). v1 -> v0 works when every
    oid (pages and invalidated handles) fits in 64 bits and is not the v0 terminator
    (2**64 - 1); otherwise StreamError names the first one. Pool flags get the target
    version's bits.
    """
    if to_version not in abi.SPEC_VERSIONS:
        raise StreamError(f"cannot convert to version {to_version}: versions are 0 and 1")
    image.check()
    if to_version == abi.SPEC_V0:
        _require_v0_oids(image)
    pools = [
        replace(pool, flags=_with_version(pool.flags, to_version), pages=list(pool.pages)) for pool in image.pools
    ]
    invalidated = None if image.invalidated is None else list(image.invalidated)
    return replace(image, version=to_version, pools=pools, invalidated=invalidated)


def _with_version(flags: int, version: int) -> int:
    cleared = flags & ~(abi.TMEM_POOL_VERSION_MASK << abi.TMEM_POOL_VERSION_SHIFT)
    return cleared | version << abi.TMEM_POOL_VERSION_SHIFT


def _require_v0_oids(image: ClientImage) -> None:
    for pool in image.pools:
        for oid, index, _ in pool.pages:
            if not _fits_v0_page(oid):
                raise StreamError(
                    f"cannot convert to v0: pool {pool.pool_id} page oid {_oid_text(oid)} index {index} "
                    "does not fit in 64 bits"
                )
    for pool_id, oid, index in image.invalidated or ():
        if not Oid(oid).fits_v0:
            raise StreamError(
                f"cannot convert to v0: pool {pool_id} invalidated oid {_oid_text(oid)} index {index} "
                "does not fit in 64 bits"
            )


def _fits_v0_page(oid: int) -> bool:
    # 2**64 - 1 fits in 64 bits but is the v0 page-list terminator, so no v0 page can have it.
    return int(oid) < V0_OID_MAX


# ===================================================================== host drivers


class ControlHost(Protocol):
    """What save/restore need from a host: the hypercall and domain death."""

    def do_tmem_op(self, client_id: int, op: bytes, page: bytearray | None = None) -> int: ...

    def destroy_client(self, client_id: int) -> None: ...


def host_versions(tmem: object) -> tuple[int, ...]:
    """The spec versions a host accepts for a new client, its own first.

    spec_version 1 host: v1 (and v0 with accept_v0); spec_version 0 host: v0 only.
    """
    spec = getattr(tmem, "spec_version", abi.SPEC_V1)
    accepted = getattr(tmem, "accepted_versions", None)
    if accepted is None:
        accepted = {spec} | ({abi.SPEC_V0} if getattr(tmem, "accept_v0", False) else set())
    return (spec, *sorted(v for v in accepted if v != spec))


def _control_version(tmem: object) -> int:
    """Layout of dom0's control records: the host's own spec version (libxc matches its Xen)."""
    return abi.SPEC_V0 if getattr(tmem, "spec_version", abi.SPEC_V1) == abi.SPEC_V0 else abi.SPEC_V1


class _Control:
    """dom0's view of one client: builds TMEM_CONTROL records and issues them."""

    def __init__(self, tmem: ControlHost, client_id: int) -> None:
        self.tmem = tmem
        self.client_id = client_id
        self.version = _control_version(tmem)

    def call(
        self, subop: int, *, pool_id: int = 0, arg1: int = 0, arg2: int = 0, oid: int = 0, buf: bytearray | None = None
    ) -> int:
        record = abi.control_record(
            subop, cli_id=self.client_id, arg1=arg1, arg2=arg2, oid=oid, pool_id=pool_id, version=self.version
        )
        return self.tmem.do_tmem_op(0, record, buf)

    def restore_new(self, pool: PoolImage, flags: int) -> int:
        record = abi.TmemOp(
            abi.TMEM_RESTORE_NEW, pool.pool_id, uuid=pool.uuid, flags=flags, arg1=self.client_id
        ).encode(self.version)
        return self.tmem.do_tmem_op(0, record, None)


# --------------------------------------------------------------------- save


def save_client(tmem: ControlHost, client_id: int, fileobj: BinaryIO, live: bool = False) -> int:
    """Save ``client_id`` as libxc's xc_tmem_save does; returns the bytes written.

    Writes nothing (returns 0) when SAVE_BEGIN says the client has no pools. A live save
    also writes the extra section of pages invalidated since SAVE_BEGIN. SAVE_END always
    follows, so the client's frozen state is what it was before.
    """
    image = snapshot_client(tmem, client_id, live=live)
    if image is None:
        return 0
    return write_stream(image, fileobj)


def snapshot_client(tmem: ControlHost, client_id: int, live: bool = False) -> ClientImage | None:
    """The ClientImage ``save_client`` would write, or None if the client has no pools."""
    ctl = _Control(tmem, client_id)
    begun = ctl.call(abi.TMEMC_SAVE_BEGIN, arg1=1 if live else 0)
    if begun == 0:
        return None
    if begun < 0:
        raise StreamError(f"SAVE_BEGIN for client {client_id} failed with {begun}")
    try:
        image = _read_client(ctl)
        image.pools = [pool for pool in (_read_host_pool(ctl, image, pid) for pid in range(image.max_pools)) if pool]
        if live:
            image.invalidated = _read_invalidated(ctl, image.version)
    finally:
        ctl.call(abi.TMEMC_SAVE_END)
    image.check()
    return image


def _checked(value: int, what: str) -> int:
    if value < 0:
        raise StreamError(f"{what} failed with {value}")
    return value


def _read_client(ctl: _Control) -> ClientImage:
    version = _checked(ctl.call(abi.TMEMC_SAVE_GET_VERSION), "SAVE_GET_VERSION")
    if version not in abi.SPEC_VERSIONS:
        raise StreamError(f"SAVE_GET_VERSION returned {version}, neither 0 nor 1")
    max_pools = _checked(ctl.call(abi.TMEMC_SAVE_GET_MAXPOOLS), "SAVE_GET_MAXPOOLS")
    return ClientImage(
        version=version,
        max_pools=min(max_pools, abi.MAX_POOLS_PER_DOMAIN),
        flags=_checked(ctl.call(abi.TMEMC_SAVE_GET_CLIENT_FLAGS), "SAVE_GET_CLIENT_FLAGS"),
        weight=_checked(ctl.call(abi.TMEMC_SAVE_GET_CLIENT_WEIGHT), "SAVE_GET_CLIENT_WEIGHT"),
        cap=_checked(ctl.call(abi.TMEMC_SAVE_GET_CLIENT_CAP), "SAVE_GET_CLIENT_CAP"),
    )


def _read_host_pool(ctl: _Control, image: ClientImage, pool_id: int) -> PoolImage | None:
    flags = ctl.call(abi.TMEMC_SAVE_GET_POOL_FLAGS, pool_id=pool_id)
    if flags == -1:
        return None
    flags = _checked(flags, f"SAVE_GET_POOL_FLAGS of pool {pool_id}")
    n_pages = _checked(ctl.call(abi.TMEMC_SAVE_GET_POOL_NPAGES, pool_id=pool_id), f"SAVE_GET_POOL_NPAGES of pool {pool_id}")
    uuid_buf = bytearray(_UUID.size)
    _checked(ctl.call(abi.TMEMC_SAVE_GET_POOL_UUID, pool_id=pool_id, arg1=len(uuid_buf), buf=uuid_buf),
             f"SAVE_GET_POOL_UUID of pool {pool_id}")
    pool = PoolImage(pool_id, flags, n_pages, _UUID.unpack(uuid_buf))
    if not pool.persistent:
        pool.n_pages = 0  # ephemeral contents are never saved; keep the image canonical
    else:
        pool.pages = _read_host_pages(ctl, pool, image.version)
    return pool


def _read_host_pages(ctl: _Control, pool: PoolImage, version: int) -> list[PageRecord]:
    handle = abi.HANDLE_V1 if version == abi.SPEC_V1 else abi.HANDLE_V0
    buf = bytearray(handle.size + pool.page_size)
    pages: list[PageRecord] = []
    while len(pages) < pool.n_pages:  # as libxc: at most n_pages, fewer if the list runs out
        got = ctl.call(abi.TMEMC_SAVE_GET_NEXT_PAGE, pool_id=pool.pool_id, arg1=len(buf), buf=buf)
        if got <= 0:
            if got not in (0, -1):
                raise StreamError(f"SAVE_GET_NEXT_PAGE of pool {pool.pool_id} failed with {got}")
            break
        _, index, oid = _unpack_handle(handle, buf)
        pages.append((oid, index, bytes(buf[handle.size:])))
    return pages


def _unpack_handle(handle: struct.Struct, buf: bytearray) -> tuple[int, int, Oid]:
    pool_id, index, *words = handle.unpack_from(buf)
    return pool_id, index, Oid.from_words(*words)


def _read_invalidated(ctl: _Control, version: int) -> list[Handle]:
    handle = abi.HANDLE_V1 if version == abi.SPEC_V1 else abi.HANDLE_V0
    buf = bytearray(handle.size)
    handles: list[Handle] = []
    while True:
        got = ctl.call(abi.TMEMC_SAVE_GET_NEXT_INV, arg1=len(buf), buf=buf)
        if got <= 0:
            _checked(got, "SAVE_GET_NEXT_INV")
            return handles
        pool_id, index, oid = _unpack_handle(handle, buf)
        handles.append((pool_id, oid, index))


# --------------------------------------------------------------------- restore


def restore_client(tmem: ControlHost, client_id: int, fileobj: BinaryIO, convert: bool = False) -> None:
    """Recreate ``client_id`` from a stream, all or nothing.

    The whole stream is read and validated first (a bad stream changes nothing). A stream
    whose version the host does not accept for a new client is refused unless ``convert``
    is true, in which case it is converted (v1 -> v0 fails if an oid needs more than 64
    bits). If applying fails part way, the client is destroyed again and StreamError raised.
    """
    image = read_stream(fileobj)
    restore_image(tmem, client_id, image, convert=convert)


def restore_image(tmem: ControlHost, client_id: int, image: ClientImage, convert: bool = False) -> None:
    """``restore_client`` for an already parsed image."""
    image = _for_host(tmem, client_id, image, convert)
    ctl = _Control(tmem, client_id)
    begun = ctl.call(abi.TMEMC_RESTORE_BEGIN)
    if begun != 1:
        # Nothing was created, so there is nothing to roll back (and an existing client is not ours).
        raise StreamError(f"RESTORE_BEGIN for client {client_id} returned {begun}: the client already exists")
    try:
        _apply(ctl, image)
    except TmemError as exc:  # StreamError from a refused step, or a record that would not encode
        tmem.destroy_client(client_id)
        raise StreamError(f"restore of client {client_id} rolled back: {exc}") from None


def _for_host(tmem: ControlHost, client_id: int, image: ClientImage, convert_allowed: bool) -> ClientImage:
    accepted = host_versions(tmem)
    if image.version in accepted:
        return image
    if not convert_allowed:
        wanted = " or ".join(f"v{v}" for v in accepted)
        raise StreamError(
            f"stream is v{image.version} but this host accepts only {wanted} for client {client_id}; "
            "convert it on restore (tmemctl restore --convert; convert=True) or first (tmemctl stream convert)"
        )
    return convert(image, accepted[0])


def _apply(ctl: _Control, image: ClientImage) -> None:
    if image.compress:
        _require_ok(ctl.call(abi.TMEMC_SET_COMPRESS, arg1=1), "SET_COMPRESS")
    # Xen 4.0/4.1 passed 0 here and lost the saved values; we restore what was saved.
    _require_ok(ctl.call(abi.TMEMC_SET_WEIGHT, arg1=image.weight), "SET_WEIGHT")
    _require_ok(ctl.call(abi.TMEMC_SET_CAP, arg1=image.cap), "SET_CAP")
    for pool in image.pools:
        _restore_pool(ctl, pool, image.version)
    for pool_id, oid, index in image.invalidated or ():
        done = ctl.call(abi.TMEMC_RESTORE_FLUSH_PAGE, pool_id=pool_id, arg2=index, oid=oid)
        if done <= 0:
            raise StreamError(f"RESTORE_FLUSH_PAGE pool {pool_id} oid {oid!r} index {index} returned {done}")
    if image.frozen:
        # Last, unlike Xen: a frozen client refuses new puts, so freezing first loses the pages.
        _require_ok(ctl.call(abi.TMEMC_FREEZE), "FREEZE")


def _require_ok(value: int, what: str) -> None:
    if value < 0:
        raise StreamError(f"{what} returned {value}")


def _restore_pool(ctl: _Control, pool: PoolImage, version: int) -> None:
    flags = pool.flags if abi.flags_version(pool.flags) == version else _with_version(pool.flags, version)
    created = ctl.restore_new(pool, flags)
    if created != pool.pool_id:
        raise StreamError(f"RESTORE_NEW of pool {pool.pool_id} (flags {flags:#x}) returned {created}")
    for oid, index, data in pool.pages:
        buf = bytearray(data)
        stored = ctl.call(
            abi.TMEMC_RESTORE_PUT_PAGE, pool_id=pool.pool_id, arg1=len(buf), arg2=index, oid=oid, buf=buf
        )
        if stored <= 0:
            raise StreamError(f"RESTORE_PUT_PAGE pool {pool.pool_id} oid {oid!r} index {index} returned {stored}")
