"""Pools: ``TmemPool`` (Xen's ``tm_pool``: objects of pages, ephemeral or persistent,
private or shared) and ``Pool``, the handle a client uses from Python.

A pool maps oid -> {index -> page descriptor} (its store, see store/). Empty objects are
removed at once. Semantics (tmem-abi.md §3):

* private ephemeral get is exclusive (the page leaves tmem); shared ephemeral and
  persistent gets are not (a shared ephemeral get moves the page to the tail of the
  FIFOs and makes the getter the object's last client);
* a get on a pool without pages is the EEMPTY fast path (no counters bumped);
* a duplicate put either replaces the data or flushes the old copy and fails (ENOSPC),
  never leaves the old data readable; it is refused (flush + ENOSPC) while the client is
  live-migrating and allowed while it is frozen;
* a new put into a frozen client fails with EFROZEN;
* persistent pages count against the owner's page limit (ENOMEM) and are never evicted.

``TmemPool`` methods assume the host lock is held; ``Pool`` methods take it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Callable

from .abi import PAGE_SIZE, TMEM_POOL_PERSIST, TMEM_POOL_SHARED, TMEM_POOL_VERSION_SHIFT
from .errors import Frozen, InvalidArgument, NoDevice, NoMemory, NoSpace
from .oid import OID_MAX, V0_OID_MAX
from .page import DATA, INDEX, OID, POOL, Stored
from .store import PageStore

if TYPE_CHECKING:
    from .client import Client
    from .tmem import Tmem

Node = list[Any]
INDEX_MAX = 0xFFFFFFFF


class TmemPool:
    """The pool itself (shared by all sharers of a shared pool). Counters use Xen's names."""

    def __init__(
        self,
        host: "Tmem",
        owner: "Client",
        pool_id: int,
        *,
        persistent: bool,
        shared: bool,
        uuid: tuple[int, int],
        version: int,
        store: PageStore,
    ) -> None:
        self.host = host
        self.client = owner  # the owner: its lists and limits are charged for the pages
        self.pool_id = pool_id  # the owner's slot
        self.persistent = persistent
        self.shared = shared
        self.exclusive = not persistent and not shared  # private ephemeral: a get removes the page
        self.uuid = uuid
        self.version = version
        self.objects = store
        self.last_client: dict[int, int] = {}  # shared pools: oid -> last client that put/got it
        self.sharers: list["Client"] = [owner] if shared else []
        self.pers_order: deque[Node] = deque()  # persistent pages in put order (lazy, like the FIFOs)
        self.save_cursor: Iterator[Node] | None = None
        self.dead = False
        self.npages = 0  # Xen pgp_count
        self.npages_max = 0
        self.obj_count_max = 0
        self.good_puts = self.no_mem_puts = 0  # puts: a property (their sum with dup_puts_flushed)
        self.dup_puts_flushed = self.dup_puts_replaced = 0
        self.found_gets = self.missed_gets = 0  # gets: a property (their sum)
        self.flushs = self.flushs_found = 0
        self.flush_objs = self.flush_objs_found = 0

    # --- identity -------------------------------------------------------------------------------

    @property
    def ephemeral(self) -> bool:
        return not self.persistent

    @property
    def obj_count(self) -> int:
        return len(self.objects)

    def flags(self, version: int) -> int:
        """The NEW_POOL flags word this pool was created with, as SAVE_GET_POOL_FLAGS reports
        it (with the version bits: the 4.3 fix X-SRFIX2)."""
        return (
            (TMEM_POOL_PERSIST if self.persistent else 0)
            | (TMEM_POOL_SHARED if self.shared else 0)
            | version << TMEM_POOL_VERSION_SHIFT
        )

    @property
    def kind(self) -> str:
        """Xen's two-letter PT: (P)ersistent/(E)phemeral then (S)hared/(P)rivate."""
        return ("P" if self.persistent else "E") + ("S" if self.shared else "P")

    def __repr__(self) -> str:
        return f"TmemPool(client={self.client.cli_id}, id={self.pool_id}, {self.kind}, pages={self.npages})"

    # --- put ------------------------------------------------------------------------------------

    def put(self, caller: "Client", oid: int, index: int, data: bytes) -> None:
        """Store a full page (``data`` is PAGE_SIZE bytes). Raises Frozen, NoMemory, NoSpace.

        A duplicate first frees the old copy (Xen frees the old data before storing the new),
        then stores like a new put; if that fails the handle is gone and the answer is NoSpace.
        On a full host the page goes in place of the oldest one (``_swap_with_oldest``) when
        that is all make_room would do, else make_room evicts and ``_store`` links it.
        """
        owner = self.client
        obj = self.objects.get(oid)
        dup = obj is not None and index in obj
        if dup:
            self._drop(obj, oid, obj.pop(index))  # type: ignore[union-attr]
            if owner.live_migrating:
                self.dup_puts_flushed += 1
                raise NoSpace("duplicate put refused while live-migrating; the old copy was flushed")
        elif owner.frozen:
            self.no_mem_puts += 1
            raise Frozen(f"client {owner.cli_id} is frozen: new puts are refused")
        host = self.host
        persistent = self.persistent
        raw = host.plain and not owner.compress
        if raw:
            stored: Stored = data
            charge = PAGE_SIZE
        else:
            stored, charge = host.codec.encode(data, not persistent, owner.compress, owner.compress_stats)
        if persistent and owner.max_pages is not None and owner.pers_count >= owner.max_pages:
            self._refuse(stored, dup, f"client {owner.cli_id} is at its limit of {owner.max_pages} persistent pages")
        swapped = False
        if host.used_bytes + charge > host.budget_bytes or host.npages >= host.max_descriptors:
            swapped = (raw and not persistent and host.used_bytes <= host.budget_bytes
                       and host.npages <= host.max_descriptors and self._swap_with_oldest(oid, index, data))
            if not swapped and not host.make_room(charge, caller):
                self._refuse(stored, dup, "no room for the page (budget full, nothing evictable)")
        if not swapped:
            self._store(oid, index, stored, charge)
        if not persistent:
            host.tot_good_eph_puts += 1
        if self.shared:
            self.last_client[oid] = caller.cli_id
        self.good_puts += 1
        if dup:
            self.dup_puts_replaced += 1

    def _store(self, oid: int, index: int, stored: Stored, charge: int) -> None:
        """Link a new descriptor into its object, the budget and the page counts, and onto the
        persistent order or the ephemeral lists."""
        host = self.host
        node = [stored, self, oid, index]
        (self.objects.get(oid) or self._object(oid))[index] = node
        host.used_bytes += charge
        host.npages += 1
        self.npages += 1
        if self.npages > self.npages_max:
            self.npages_max = self.npages
        if host.npages > host.npages_max:
            host.npages_max = host.npages
        if host.used_bytes > host.used_bytes_max:
            host.used_bytes_max = host.used_bytes
        if self.persistent:
            self.pers_order.append(node)
            self.client.pers_count += 1
            self.client.succ_pers_puts += 1
            if len(self.pers_order) > 2 * self.npages + 256:
                self.pers_order = deque(n for n in self.pers_order if n)
        else:
            host.eviction.append(node, self.client)

    def _swap_with_oldest(self, oid: int, index: int, data: bytes) -> bool:
        """On a full plain host without weights, make_room would evict exactly one page: the oldest
        live one. When that is a raw page of this pool, evict it and store ``data`` in its place;
        the byte, page and ephemeral counts would go down by one and straight back up (their
        maxima cannot move), so they are left alone. False when the case does not apply."""
        eviction = self.host.eviction
        queue = eviction.global_list
        while queue and not queue[0]:
            queue.popleft()  # dead descriptors: make_room would skip them the same way
        if not queue or eviction.weight_total:
            return False
        victim = queue[0]
        if victim[POOL] is not self or type(victim[DATA]) is not bytes:
            return False
        queue.popleft()
        eviction.evict_attempts += 1
        eviction.evicted_pgs += 1
        self._unlink_raw(victim)
        node = [data, self, oid, index]
        (self.objects.get(oid) or self._object(oid))[index] = node
        queue.append(node)
        if len(queue) > eviction.compact_at:
            eviction.compact(self.client)
        return True

    def _object(self, oid: int) -> dict[int, Node]:
        """The object's pages, created (and counted) when the object does not exist yet."""
        obj = self.objects.get(oid)
        if obj is None:
            obj = self.objects[oid] = {}
            host = self.host
            host.obj_count += 1
            if len(self.objects) > self.obj_count_max:
                self.obj_count_max = len(self.objects)
            if host.obj_count > host.obj_count_max:
                host.obj_count_max = host.obj_count
        return obj

    def _unlink_raw(self, node: Node) -> None:
        """Take a raw page's descriptor out of its object, and the object out of the pool when it
        empties; the caller settles the counts."""
        oid = node[OID]
        obj = self.objects[oid]
        del obj[node[INDEX]]
        if not obj:
            del self.objects[oid]
            self.host.obj_count -= 1
            if self.shared:
                self.last_client.pop(oid, None)
        node.clear()

    def _refuse(self, stored: Stored, dup: bool, reason: str) -> None:
        """A put that found no room: undo the encoding, count, raise (NoSpace for a
        duplicate, whose old copy is already gone; else NoMemory)."""
        if type(stored) is not bytes:
            self.host.codec.release(stored, self.client.compress_stats)
        if dup:
            self.dup_puts_flushed += 1
            raise NoSpace("duplicate put could not be stored; the old copy was flushed")
        self.no_mem_puts += 1
        raise NoMemory(reason)

    @property
    def puts(self) -> int:
        """Every put ends as exactly one of these three (a frozen refusal counts as no_mem)."""
        return self.good_puts + self.no_mem_puts + self.dup_puts_flushed

    @property
    def gets(self) -> int:
        return self.found_gets + self.missed_gets

    # --- get ------------------------------------------------------------------------------------

    def get(self, caller: "Client", oid: int, index: int) -> bytes | None:
        """The page, or None. Private ephemeral gets remove it (exclusive)."""
        if not self.npages:
            return None  # Xen's EEMPTY fast path: nothing counted
        obj = self.objects.get(oid)
        if obj is None:
            self.missed_gets += 1
            return None
        if not self.exclusive:
            return self._get_shared_or_persistent(caller, obj, oid, index)
        node = obj.pop(index, None)
        if node is None:
            self.missed_gets += 1
            return None
        owner = self.client
        stored = node[DATA]
        if type(stored) is bytes:  # the common case, with _drop inlined
            self.found_gets += 1
            owner.succ_eph_gets += 1
            host = self.host
            if not obj:
                del self.objects[oid]
                host.obj_count -= 1
            node.clear()
            host.used_bytes -= PAGE_SIZE
            host.npages -= 1
            self.npages -= 1
            host.eviction.global_eph_count -= 1
            owner.eph_count -= 1
            return stored
        data = self.host.codec.decode(stored)
        self._drop(obj, oid, node)
        if data is None:  # a remote page its store lost: gone now, and a miss
            self.missed_gets += 1
            return None
        self.found_gets += 1
        owner.succ_eph_gets += 1
        return data

    def _get_shared_or_persistent(self, caller: "Client", obj: dict[int, Node], oid: int, index: int) -> bytes | None:
        node = obj.get(index)
        if node is None:
            self.missed_gets += 1
            return None
        stored = node[DATA]
        data = stored if type(stored) is bytes else self.host.codec.decode(stored)
        if data is None:  # a (shared ephemeral) remote page its store lost: drop it, a miss
            del obj[index]
            self._drop(obj, oid, node)
            self.missed_gets += 1
            return None
        self.found_gets += 1
        if self.persistent:
            self.client.succ_pers_gets += 1
        else:
            self.client.succ_eph_gets += 1
            self.refresh(node)
            self.last_client[oid] = caller.cli_id
        return data

    def peek(self, oid: int, index: int) -> bytes | None:
        """The page without any side effect (no counters, no exclusivity, no LRU move)."""
        obj = self.objects.get(oid)
        node = obj.get(index) if obj is not None else None
        if node is None:
            return None
        return self.host.codec.decode(node[DATA])

    def refresh(self, node: Node, *, reprieve: bool = False) -> None:
        """Move a live ephemeral page to the tail of both FIFOs (a fresh descriptor)."""
        fresh = [node[DATA], self, node[OID], node[INDEX]]
        if reprieve:
            fresh.append(True)
        self.objects[node[OID]][node[INDEX]] = fresh
        node.clear()
        self.host.eviction.forget(self.client)
        self.host.eviction.append(fresh, self.client)

    # --- flush ----------------------------------------------------------------------------------

    def flush_page(self, oid: int, index: int) -> bool:
        """Remove one page; True if it was there."""
        self.flushs += 1
        obj = self.objects.get(oid)
        if obj is None:
            return False
        node = obj.pop(index, None)
        if node is None:
            return False
        self._drop(obj, oid, node)
        self.flushs_found += 1
        return True

    def flush_object(self, oid: int) -> int:
        """Remove every page of an object; the number removed."""
        self.flush_objs += 1
        obj = self.objects.get(oid)
        if obj is None:
            return 0
        self.flush_objs_found += 1
        return self._destroy_object(oid, obj)

    def evict(self, node: Node) -> None:
        """Remove the page the eviction hook chose."""
        if type(node[DATA]) is not bytes:
            oid = node[OID]
            obj = self.objects[oid]
            del obj[node[INDEX]]
            self._drop(obj, oid, node)
            return
        self._unlink_raw(node)  # a raw ephemeral page: no codec to release (most puts of a full host)
        host = self.host
        host.used_bytes -= PAGE_SIZE
        host.npages -= 1
        self.npages -= 1
        host.eviction.global_eph_count -= 1
        self.client.eph_count -= 1

    def destroy_objects(self, only_client: int | None = None) -> None:
        """Remove all objects, or only those whose last client is ``only_client`` (a sharer
        leaving a shared pool)."""
        if only_client is None:
            oids = list(self.objects)
        else:
            oids = [oid for oid, cid in self.last_client.items() if cid == only_client]
        for oid in oids:
            self._destroy_object(oid, self.objects[oid])

    def _destroy_object(self, oid: int, obj: dict[int, Node]) -> int:
        count = 0
        while obj:
            _, node = obj.popitem()
            self._drop(obj, oid, node)
            count += 1
        return count

    def _drop(self, obj: dict[int, Node], oid: int, node: Node) -> None:
        """Free a descriptor already taken out of ``obj``; remove ``obj`` if now empty."""
        host = self.host
        owner = self.client
        if not obj:
            del self.objects[oid]
            host.obj_count -= 1
            if self.shared:
                self.last_client.pop(oid, None)
        stored = node[DATA]
        if self.persistent:
            owner.pers_count -= 1
            if owner.live_migrating:
                owner.invalidated.append((self.pool_id, oid, node[INDEX]))
        else:
            host.eviction.global_eph_count -= 1
            owner.eph_count -= 1
        node.clear()
        host.used_bytes -= PAGE_SIZE if type(stored) is bytes else host.codec.release(stored, owner.compress_stats)
        host.npages -= 1
        self.npages -= 1

    # --- save support -----------------------------------------------------------------------------

    def next_saved_page(self) -> Node | None:
        """The next persistent page in put order for SAVE_GET_NEXT_PAGE, or None at the end."""
        if self.save_cursor is None:
            self.save_cursor = iter([n for n in self.pers_order if n])
        for node in self.save_cursor:
            if node:
                return node
        return None

    def live_nodes(self) -> Iterator[Node]:
        for obj in self.objects.values():
            yield from obj.values()

    # --- invariants -----------------------------------------------------------------------------

    def check(self) -> None:
        count = 0
        for oid, obj in self.objects.items():
            assert obj, f"{self!r}: empty object {oid:#x} left behind"
            for index, node in obj.items():
                assert node[POOL] is self and node[OID] == oid and node[INDEX] == index, f"{self!r}: misfiled page"
                assert node[DATA] is not None, f"{self!r}: live page without data"
                count += 1
        assert count == self.npages, f"{self!r}: pgp_count {self.npages} != {count} pages held"
        if self.persistent:
            on_list = [n for n in self.pers_order if n]
            assert len(on_list) == count, f"{self!r}: persistent put-order list out of step"
            assert len({id(n) for n in on_list}) == count, f"{self!r}: a page is on the put-order list twice"
        if self.shared:
            assert set(self.last_client) == set(self.objects), f"{self!r}: last-client table out of step"
            assert self.client in self.sharers, f"{self!r}: owner is not a sharer"
            for sharer in self.sharers:
                assert self in sharer.pools, f"{self!r}: sharer {sharer.cli_id} lost its slot"
        else:
            assert not self.last_client and not self.sharers, f"{self!r}: private pool with sharers"
        assert not self.dead, f"{self!r}: a dead pool is still reachable"


class Pool:
    """A client's handle on one of its pool slots: the Pythonic API.

    ``put(oid, index, data) -> bool`` returns True when stored and False when refused for
    lack of memory (ENOMEM, or ENOSPC for a duplicate whose old copy was flushed);
    ``get(oid, index) -> bytes | None`` returns the page or None (a miss). Misuse and state
    errors raise TmemError subclasses: Frozen (new put into a frozen client), NoDevice (pool
    destroyed), InvalidArgument (bad oid, index or data).

    ``put`` and ``get`` are the hot path, so they are per-handle closures stored in slots
    (see ``_hot_path``), not methods: everything they use per call is a closure cell.
    """

    __slots__ = ("client", "pool_id", "_pool", "_lock", "_oid_limit", "put", "get")

    put: "Callable[[int, int, bytes], bool]"
    get: "Callable[[int, int], bytes | None]"

    def __init__(self, client: "Client", pool_id: int, pool: TmemPool) -> None:
        self.client = client
        self.pool_id = pool_id
        self._pool = pool
        self._lock = client.host.lock
        # the all-ones oid of the client's version is the save-stream terminator: never stored
        self._oid_limit = V0_OID_MAX if client.version == 0 else OID_MAX
        self.put, self.get = _hot_path(self)

    @property
    def persistent(self) -> bool:
        return self._pool.persistent

    @property
    def shared(self) -> bool:
        return self._pool.shared

    @property
    def uuid(self) -> tuple[int, int]:
        return self._pool.uuid

    @property
    def npages(self) -> int:
        return self._pool.npages

    def _live(self) -> TmemPool:
        pool = self._pool
        if self.client.pools[self.pool_id] is not pool:
            raise NoDevice(f"pool {self.pool_id} of client {self.client.cli_id} was destroyed")
        return pool

    def _key(self, oid: int, index: int) -> None:
        _check_key(oid, index, self._oid_limit)

    def flush_page(self, oid: int, index: int) -> bool:
        """True if the page was there. (A frozen client's flushes act; the ABI's -EFROZEN
        answer has no Python counterpart.)"""
        self._key(oid, index)
        with self._lock:
            return self._live().flush_page(oid, index)

    def flush_object(self, oid: int) -> int:
        self._key(oid, 0)
        with self._lock:
            return self._live().flush_object(oid)

    def destroy(self) -> bool:
        """Destroy (or, for a shared pool, leave) the pool; False if already gone."""
        with self._lock:
            if self.client.pools[self.pool_id] is not self._pool:
                return False
            return self.client.destroy_pool(self.pool_id)

    def check(self) -> None:
        with self._lock:
            self._live().check()

    def __repr__(self) -> str:
        return f"Pool(client={self.client.cli_id}, pool_id={self.pool_id}, {self._pool.kind})"


def _hot_path(handle: Pool) -> "tuple[Callable[[int, int, bytes], bool], Callable[[int, int], bytes | None]]":
    """``handle.put`` and ``handle.get``: validate, take the host lock (acquire/try/finally,
    measured ~70 ns cheaper than ``with`` on CPython 3.11), check the slot still holds this
    pool, call the pool. (The closures do not capture ``handle``: no reference cycle.)"""
    client, pool_id, pool, oid_limit = handle.client, handle.pool_id, handle._pool, handle._oid_limit
    acquire, release = handle._lock.acquire, handle._lock.release
    slots = client.pools  # the client's slot list (mutated in place, never replaced)
    pool_put, pool_get = pool.put, pool.get

    def put(oid: int, index: int, data: bytes) -> bool:
        if type(data) is not bytes or len(data) != PAGE_SIZE:
            data = _page_bytes(data)
        if type(oid) is not int or type(index) is not int or not (0 <= oid < oid_limit and 0 <= index <= INDEX_MAX):
            _check_key(oid, index, oid_limit)
        acquire()
        try:
            if slots[pool_id] is not pool:
                raise NoDevice(f"pool {pool_id} of client {client.cli_id} was destroyed")
            pool_put(client, oid, index, data)
            return True
        except (NoMemory, NoSpace):
            return False
        finally:
            release()

    def get(oid: int, index: int) -> bytes | None:
        if type(oid) is not int or type(index) is not int or not (0 <= oid < oid_limit and 0 <= index <= INDEX_MAX):
            _check_key(oid, index, oid_limit)
        acquire()
        try:
            if slots[pool_id] is not pool:
                raise NoDevice(f"pool {pool_id} of client {client.cli_id} was destroyed")
            return pool_get(client, oid, index)
        finally:
            release()

    return put, get


def _check_key(oid: object, index: object, oid_limit: int) -> None:
    if not (isinstance(oid, int) and 0 <= oid < oid_limit):
        raise InvalidArgument(f"oid {oid!r} is not a valid (non-terminator) object id")
    if not (isinstance(index, int) and 0 <= index <= INDEX_MAX):
        raise InvalidArgument(f"index {index!r} does not fit in a u32")


def _page_bytes(data: object) -> bytes:
    """A page argument as immutable bytes (copying a bytearray/memoryview), or InvalidArgument."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"page data must be bytes-like, got {type(data).__name__}")
    raw = bytes(data)
    if len(raw) != PAGE_SIZE:
        raise InvalidArgument(f"a page is {PAGE_SIZE} bytes, got {len(raw)}")
    return raw
