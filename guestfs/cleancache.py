"""The cleancache frontend, after Linux ``mm/cleancache.c`` + ``drivers/xen/tmem.c``.

One ephemeral tmem pool per backing filesystem: ``init_fs`` sends NEW_POOL,
``invalidate_fs`` DESTROY_POOL. The pool is private (gets are exclusive: a hit leaves the host),
or, with ``shared_uuid``, a shared pool of that uuid (gets are not exclusive: a hit stays in the
host, as Xen's shared ephemeral pools and what an inclusive second chance behind the kernel's
page cache needs). ``get_page``/``put_page`` move whole 4096-byte pages;
``invalidate_page``/``invalidate_inode`` send FLUSH_PAGE/FLUSH_OBJECT. A put always
"succeeds" (the host may drop it); a get returns ``bytes`` or ``None``.

Page frames: a get lands in the frontend's reusable 4096-byte ``bytearray`` and is copied out as
``bytes``. A put of a full ``bytes`` page hands that page itself to the transport as the frame:
it is immutable, so the host may keep it without the copy a reused frame needs (the in-process
host does; ``tmemd``'s wire sends its bytes as before). Shorter or mutable pages are sent as a
zero-padded ``bytes`` copy.

ABI (``abi``):

``v1``    56-byte records; the wire oid is the key's 192-bit oid (Linux's filekey words).
``v0``    40-byte records; the 192-bit key is folded to the 64-bit v0 object id by ``fold``:
          ``xxh64`` of ``FileKey.identity_bytes()`` (default) or ``ino`` (the inode number
          alone, as v0-era guests keyed files).
``auto``  NEW_POOL v1; if the host answers -EPERM (a v0 host), NEW_POOL v0; if that fails too,
          or v1 failed with any other error, passthrough.

``mode`` after ``init_fs``: ``v1`` | ``v0-xxh64`` | ``v0-ino`` | ``passthrough``.

Ownership guard (all modes). The frontend remembers, per pool, which pages it may have put:
``key -> _Object(wire oid, indexes possibly in tmem)``, plus ``wire oid -> owning key``. An
object exists exactly while some of its pages may be in the host (a private ephemeral get is
exclusive, so a get -- hit or miss -- removes the index; a non-exclusive get removes it on a miss;
flushes remove it; the host's own
silent evictions are not visible, so the set is a *superset* of what the host holds). A key
whose wire oid is owned by a different key is bypassed: its puts are dropped and its gets miss
(``fold_collisions`` in v0, ``oid_collisions`` in v1, where it can only happen between
different handle types, devices or key sources). So tmem never serves one file's bytes to
another. Ownership ends when the owner's last possibly-stored page is gone (got, flushed, or
its object invalidated), so a reused inode number gets the slot only after the old file's pages
were flushed. Because the set is a superset, gets for pages never put skip the host call
(counted as ``failed_gets`` and ``gets_skipped``) and invalidations of pages never put send
nothing.

To bound memory, at most ``max_tracked_pages`` pages are tracked; beyond that the oldest object
is flushed from the host (FLUSH_OBJECT) and forgotten (``tracked_object_flushes``).

Transport failure (``OSError`` from the transport, e.g. the tmemd server died): the op counts
as a miss, ``transport_errors`` is bumped and the frontend switches to passthrough for good,
because it can no longer prove that its flushes reached the host (a later get could otherwise
return a page that a lost flush should have removed).

Not thread-safe: ``PageIO`` serialises calls with its lock.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable

import xxhash
from tmemcore.abi import (
    PAGE_SIZE,
    SPEC_V0,
    SPEC_V1,
    TMEM_DESTROY_POOL,
    TMEM_FLUSH_OBJECT,
    TMEM_FLUSH_PAGE,
    TMEM_GET_PAGE,
    TMEM_PUT_PAGE,
    gen_record,
    new_pool_record,
    pool_flags,
)

from .filekey import FileKey
from .transport import Transport

ABIS = ("v1", "v0", "auto")
FOLDS = ("xxh64", "ino")
MAX_INDEX = 0xFFFF_FFFF  # the record's index is a u32; Linux skipped pages beyond it
_ZERO_PAGE = bytes(PAGE_SIZE)
_NO_INDEXES: frozenset[int] = frozenset()


def _field_offset(cmd: int, index: int, version: int) -> int:
    """Where the first byte differing from a GET of index 0 sits, found from tmemcore.abi itself."""
    base = gen_record(TMEM_GET_PAGE, 0, 0, 0, version)
    other = gen_record(cmd, 0, 0, index, version)
    changed = [i for i in range(len(base)) if base[i] != other[i]]
    assert changed and changed[-1] - changed[0] < 4, changed  # one u32 field
    return changed[0]


# The record layouts stay in tmemcore.abi; these offsets are derived from it once, so the hot
# path can splice a page index (and the PUT command) into a record built by gen_record.
_INDEX_OFFSET = {v: _field_offset(TMEM_GET_PAGE, MAX_INDEX, v) for v in (SPEC_V1, SPEC_V0)}
assert all(_field_offset(TMEM_PUT_PAGE, 0, v) == 0 for v in (SPEC_V1, SPEC_V0))  # cmd leads the record
_PUT_CMD = gen_record(TMEM_PUT_PAGE, 0, 0, 0)[:4]
# head (bytes before the index), index (u32), tail: one C call splices a record (measured about
# half the time of ``head + pack(index) + tail``); the sizes come from the records abi builds.
_SPLICE = {
    v: struct.Struct(f"<{at}sI{len(gen_record(TMEM_GET_PAGE, 0, 0, 0, v)) - at - 4}s") for v, at in _INDEX_OFFSET.items()
}
TEMPLATE_CACHE_MAX = 1 << 16


class _Object:
    """The pages of one file that may be in the pool, under the file's wire oid.

    The GET/PUT record bytes before and after the index come from ``tmemcore.abi.gen_record``
    (via a per-key template); a page op only splices in its index (the hot path).
    """

    __slots__ = ("wire_oid", "indexes", "get_head", "put_head", "tail", "splice")

    def __init__(self, template: tuple[int, bytes, bytes, bytes, Callable[[bytes, int, bytes], bytes]]) -> None:
        self.wire_oid, self.get_head, self.put_head, self.tail, self.splice = template
        self.indexes: set[int] = set()

    def record(self, head: bytes, index: int) -> bytes:
        return self.splice(head, index, self.tail)


class CleanCache:
    """Frontend of one tmem pool (one backing filesystem)."""

    def __init__(
        self,
        transport: Transport,
        *,
        abi: str = "v1",
        fold: str = "xxh64",
        max_tracked_pages: int = 1 << 20,
        shared_uuid: tuple[int, int] | None = None,
    ) -> None:
        if abi not in ABIS:
            raise ValueError(f"abi must be one of {', '.join(ABIS)}, got {abi!r}")
        if fold not in FOLDS:
            raise ValueError(f"fold must be one of {', '.join(FOLDS)}, got {fold!r}")
        if max_tracked_pages < 1:
            raise ValueError(f"max_tracked_pages must be >= 1, got {max_tracked_pages}")
        self.transport = transport
        self.abi = abi
        self.fold = fold
        self.max_tracked_pages = max_tracked_pages
        self.shared_uuid = shared_uuid
        self.exclusive_gets = shared_uuid is None  # a private ephemeral pool's gets remove the page
        self.mode = "uninitialised"
        self.disabled_reason = ""
        self._pool_id = -1
        self._version = SPEC_V1
        self._page = bytearray(PAGE_SIZE)  # the frame every get lands in
        self._objects: dict[FileKey, _Object] = {}
        self._owners: dict[int, FileKey] = {}
        # wire oid + record pieces per key, kept across object lifetimes (a file's object comes
        # and goes as its pages are got back); cleared when full or when the pool changes.
        self._templates: dict[FileKey, tuple[int, bytes, bytes, bytes, Callable[[bytes, int, bytes], bytes]]] = {}
        self._tracked = 0
        self.succ_gets = 0
        self.failed_gets = 0
        self.gets_skipped = 0
        self.puts = 0
        self.puts_dropped = 0
        self.host_put_failures = 0
        self.invalidates = 0
        self.flushes_sent = 0
        self.fold_collisions = 0
        self.oid_collisions = 0
        self.index_overflows = 0
        self.transport_errors = 0
        self.tracked_object_flushes = 0

    # --- pool lifetime -------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self._pool_id >= 0

    def init_fs(self) -> None:
        """Create the pool (NEW_POOL) per ``abi``; on failure run as passthrough."""
        if self.active:
            raise RuntimeError("init_fs called twice without invalidate_fs")
        versions = {"v1": (SPEC_V1,), "v0": (SPEC_V0,), "auto": (SPEC_V1, SPEC_V0)}[self.abi]
        errors_before = self.transport_errors
        for version in versions:
            flags = pool_flags(shared=self.shared_uuid is not None, version=version)
            rc = self._call(new_pool_record(flags, self.shared_uuid or (0, 0), version=version))
            if rc >= 0:
                self._pool_id, self._version = rc, version
                self.mode = "v1" if version == SPEC_V1 else f"v0-{self.fold}"
                self.disabled_reason = ""
                return
            self.disabled_reason = f"NEW_POOL v{version} returned {rc}"
            if rc != -errno.EPERM or self.transport_errors != errors_before:
                break  # only a version mismatch (-EPERM) is worth a v0 retry
        self.mode = "passthrough"

    def invalidate_fs(self) -> None:
        """Destroy the pool (unmount). Idempotent."""
        if self.active:
            self._call(gen_record(TMEM_DESTROY_POOL, self._pool_id, 0, 0, self._version))
        self._forget_all()
        if self.mode != "uninitialised":
            self.mode = "passthrough"

    # --- pages -------------------------------------------------------------------------------

    def get_page(self, key: FileKey, index: int) -> bytes | None:
        """The page's 4096 bytes from tmem, or None. A private pool's get removes the page (exclusive)."""
        obj = self._objects.get(key)
        indexes = obj.indexes if obj is not None else _NO_INDEXES
        if index not in indexes:
            if self._pool_id >= 0:  # active (the property costs a frame on this hot path)
                self.failed_gets += 1
                self.gets_skipped += 1
            return None
        if not self.exclusive_gets:
            return self._get_kept(key, obj, index)  # type: ignore[arg-type]
        indexes.discard(index)  # _untrack, inlined (hot path): a private get is exclusive, hit or miss
        self._tracked -= 1
        if not indexes:
            del self._objects[key]
            del self._owners[obj.wire_oid]
        page = self._page
        try:
            rc = self.transport.call(obj.splice(obj.get_head, index, obj.tail), page)
        except OSError as exc:
            rc = self._transport_failed(exc)
        if rc == 1:
            self.succ_gets += 1
            return bytes(page)
        self.failed_gets += 1
        return None

    def _get_kept(self, key: FileKey, obj: _Object, index: int) -> bytes | None:
        """A non-exclusive get (shared pool) of a tracked page: a hit stays tracked (the host kept
        it), a miss untracks it (the host dropped it)."""
        page = self._page
        try:
            rc = self.transport.call(obj.splice(obj.get_head, index, obj.tail), page)
        except OSError as exc:
            rc = self._transport_failed(exc)
        if rc == 1:
            self.succ_gets += 1
            return bytes(page)
        self.failed_gets += 1
        if self._pool_id >= 0:  # (a transport failure forgot every object already)
            self._untrack(key, obj, index)
        return None

    def get_pages(self, key: FileKey, indexes: list[int]) -> list[bytes | None]:
        """``get_page`` of each index in order (one object lookup for the run); None = miss."""
        obj = self._objects.get(key)  # an object exists only while the pool is active
        if obj is None:
            if self._pool_id >= 0:
                self.failed_gets += len(indexes)
                self.gets_skipped += len(indexes)
            return [None] * len(indexes)
        if not self.exclusive_gets:
            return [self.get_page(key, index) for index in indexes]
        tracked = obj.indexes
        page, call = self._page, self.transport.call
        head, tail, splice = obj.get_head, obj.tail, obj.splice
        out: list[bytes | None] = []
        for index in indexes:
            if index not in tracked or self._pool_id < 0:  # never put, or the transport failed meanwhile
                if self._pool_id >= 0:
                    self.failed_gets += 1
                    self.gets_skipped += 1
                out.append(None)
                continue
            tracked.discard(index)  # _untrack, inlined: a private get is exclusive, hit or miss
            self._tracked -= 1
            if not tracked:
                del self._objects[key]
                del self._owners[obj.wire_oid]
            try:
                rc = call(splice(head, index, tail), page)
            except OSError as exc:
                rc = self._transport_failed(exc)
            if rc == 1:
                self.succ_gets += 1
                out.append(bytes(page))
            else:
                self.failed_gets += 1
                out.append(None)
        return out

    def put_page(self, key: FileKey, index: int, data: bytes) -> None:
        """Offer a clean page (<= 4096 bytes, zero-padded) to tmem. Always "succeeds"."""
        obj = self._objects.get(key)  # an object exists only while the pool is active
        if obj is None or type(data) is not bytes or len(data) != PAGE_SIZE or index > MAX_INDEX:
            self._put_page_general(key, index, data, obj)
            return
        # A full immutable page of a file that has pages in the pool (the common case): the host
        # may keep the page itself, no frame copy.
        self.puts += 1
        indexes = obj.indexes
        if index not in indexes:
            indexes.add(index)
            self._tracked += 1
        try:
            rc = self.transport.call(obj.splice(obj.put_head, index, obj.tail), data)
        except OSError as exc:
            rc = self._transport_failed(exc)
        if rc != 1:
            self.host_put_failures += 1  # still tracked: a failed duplicate put may leave nothing, never old data
        if self._tracked > self.max_tracked_pages:
            self._flush_oldest_object()

    def _put_page_general(self, key: FileKey, index: int, data: bytes, obj: _Object | None) -> None:
        """What ``put_page``'s common case does not take: an inactive pool (nothing to do), a page
        over 4096 bytes (an error), a file with no object yet (claim its wire oid), an index past
        the record's u32 (dropped), a short or mutable page (sent as a zero-padded copy)."""
        if self._pool_id < 0:  # not active
            return
        size = len(data)
        if size > PAGE_SIZE:
            raise ValueError(f"a page is at most {PAGE_SIZE} bytes, got {size}")
        if obj is None:
            obj = self._claim(key, index)  # None: the oid is another key's, or the index overflows
        elif index > MAX_INDEX:
            self.index_overflows += 1
            obj = None
        if obj is None:
            self.puts += 1
            self.puts_dropped += 1
            return
        if size != PAGE_SIZE or type(data) is not bytes:
            data = bytes(data) + _ZERO_PAGE[size:]
        self.put_page(key, index, data)  # the common case now

    def put_pages(self, key: FileKey, pages: list[tuple[int, bytes]]) -> None:
        """``put_page`` of each ``(index, page)`` in order."""
        put = self.put_page
        for index, data in pages:
            put(key, index, data)

    def holds_any(self, key: FileKey, indexes: list[int]) -> bool:
        """True when any of the pages may be in tmem."""
        obj = self._objects.get(key)
        return obj is not None and not obj.indexes.isdisjoint(indexes)

    def holds(self, key: FileKey, index: int) -> bool:
        """True when the page may be in tmem (it was put and not since got or flushed)."""
        obj = self._objects.get(key)
        return obj is not None and index in obj.indexes

    def tracked_keys(self) -> list[FileKey]:
        """The files that may have pages in tmem."""
        return list(self._objects)

    def invalidate_page(self, key: FileKey, index: int) -> None:
        """FLUSH_PAGE: the page's tmem copy is gone afterwards."""
        if not self.active:
            return
        self.invalidates += 1
        obj = self._objects.get(key)
        if obj is None or index not in obj.indexes:
            return
        self._untrack(key, obj, index)
        self.flushes_sent += 1
        self._call(gen_record(TMEM_FLUSH_PAGE, self._pool_id, obj.wire_oid, index, self._version))

    def invalidate_inode(self, key: FileKey) -> None:
        """FLUSH_OBJECT: all the file's tmem pages are gone and its oid is released."""
        if not self.active:
            return
        self.invalidates += 1
        obj = self._objects.get(key)
        if obj is None:
            return
        self._release(key, obj)
        self.flushes_sent += 1
        self._call(gen_record(TMEM_FLUSH_OBJECT, self._pool_id, obj.wire_oid, 0, self._version))

    # --- introspection -------------------------------------------------------------------

    def stats(self) -> dict[str, int | str]:
        return {
            "mode": self.mode,
            "abi": self.abi,
            "fold": self.fold,
            "pool_id": self._pool_id,
            "exclusive_gets": self.exclusive_gets,
            "disabled_reason": self.disabled_reason,
            "succ_gets": self.succ_gets,
            "failed_gets": self.failed_gets,
            "gets_skipped": self.gets_skipped,
            "puts": self.puts,
            "puts_dropped": self.puts_dropped,
            "host_put_failures": self.host_put_failures,
            "invalidates": self.invalidates,
            "flushes_sent": self.flushes_sent,
            "fold_collisions": self.fold_collisions,
            "oid_collisions": self.oid_collisions,
            "index_overflows": self.index_overflows,
            "transport_errors": self.transport_errors,
            "tracked_pages": self._tracked,
            "tracked_objects": len(self._objects),
            "tracked_object_flushes": self.tracked_object_flushes,
        }

    def check(self) -> None:
        """Assert the frontend's invariants."""
        assert self.mode in ("uninitialised", "passthrough", "v1", "v0-xxh64", "v0-ino"), self.mode
        assert self.active == (self.mode not in ("uninitialised", "passthrough")), (self.mode, self._pool_id)
        assert self.mode.startswith("v0") == (self.active and self._version == SPEC_V0)
        if not self.active:
            assert not self._objects and not self._owners and self._tracked == 0
        assert len(self._objects) == len(self._owners)
        assert self._tracked == sum(len(obj.indexes) for obj in self._objects.values())
        assert self._tracked <= self.max_tracked_pages
        for key, obj in self._objects.items():
            assert obj.indexes, f"empty object left for {key}"
            assert self._owners.get(obj.wire_oid) is key, f"{key} does not own its oid"
            assert obj.wire_oid == self.wire_oid(key)
            assert obj.record(obj.get_head, 7) == gen_record(TMEM_GET_PAGE, self._pool_id, obj.wire_oid, 7, self._version)
            assert obj.record(obj.put_head, 7) == gen_record(TMEM_PUT_PAGE, self._pool_id, obj.wire_oid, 7, self._version)
            assert max(obj.indexes) <= MAX_INDEX
        assert self.succ_gets + self.failed_gets >= self.gets_skipped

    def wire_oid(self, key: FileKey) -> int:
        """The object id this key travels under in the current mode (folded in v0)."""
        if self._version == SPEC_V1:
            return key.oid
        if self.fold == "ino":
            return key.ino & 0xFFFF_FFFF_FFFF_FFFF
        return xxhash.xxh64_intdigest(key.identity_bytes())

    # --- internals -------------------------------------------------------------------------

    def _claim(self, key: FileKey, index: int) -> _Object | None:
        """A new object for ``key`` if its wire oid is free (and the index fits), else None."""
        if index > MAX_INDEX:
            self.index_overflows += 1
            return None
        template = self._templates.get(key)
        if template is None:
            template = self._template(key)
        wire_oid = template[0]
        if wire_oid in self._owners:  # owned by another key (ours would be in _objects)
            if self._version == SPEC_V0:
                self.fold_collisions += 1
            else:
                self.oid_collisions += 1
            return None
        obj = _Object(template)
        self._objects[key] = obj
        self._owners[wire_oid] = key
        return obj

    def _template(self, key: FileKey) -> tuple[int, bytes, bytes, bytes, Callable[[bytes, int, bytes], bytes]]:
        wire_oid = self.wire_oid(key)
        at = _INDEX_OFFSET[self._version]
        get = gen_record(TMEM_GET_PAGE, self._pool_id, wire_oid, 0, self._version)
        template = (wire_oid, get[:at], _PUT_CMD + get[4:at], get[at + 4 :], _SPLICE[self._version].pack)
        if len(self._templates) >= TEMPLATE_CACHE_MAX:
            self._templates.clear()
        self._templates[key] = template
        return template

    def _untrack(self, key: FileKey, obj: _Object, index: int) -> None:
        obj.indexes.discard(index)
        self._tracked -= 1
        if not obj.indexes:
            del self._objects[key]
            del self._owners[obj.wire_oid]

    def _release(self, key: FileKey, obj: _Object) -> None:
        self._tracked -= len(obj.indexes)
        del self._objects[key]
        del self._owners[obj.wire_oid]

    def _flush_oldest_object(self) -> None:
        key = next(iter(self._objects))
        obj = self._objects[key]
        self._release(key, obj)
        self.tracked_object_flushes += 1
        self._call(gen_record(TMEM_FLUSH_OBJECT, self._pool_id, obj.wire_oid, 0, self._version))

    def _forget_all(self) -> None:
        self._objects.clear()
        self._templates.clear()
        self._owners.clear()
        self._tracked = 0
        self._pool_id = -1

    def _call(self, op: bytes, page: bytearray | None = None) -> int:
        try:
            return self.transport.call(op, page)
        except OSError as exc:
            return self._transport_failed(exc)

    def _transport_failed(self, exc: OSError) -> int:
        """Count the failure and switch off for good: a lost flush could leave stale pages."""
        self.transport_errors += 1
        self.disabled_reason = f"transport error: {exc}"
        self._forget_all()
        self.mode = "passthrough"
        return -errno.EIO
