"""The tmem host: clients, the memory budget, the global shared-pool table, one lock.

``Tmem(memory_pages=N)`` stores at most N pages' worth of page data: the budget is
accounted in bytes of *stored* data (a raw page costs 4096, a compressed page its
compressed size, a deduplicated content once however many pages share it, a TZE page its
trimmed size), so compression, dedup and TZE really let more pages in. Descriptors are
additionally capped at ``DESCRIPTORS_PER_PAGE`` per budget page so that pages costing
(almost) nothing cannot grow without bound.

Thread safety: one ``threading.RLock`` (``Tmem.lock``); the hypercall path takes it once
per op, the Pythonic API once per call.
"""

from __future__ import annotations

import json
import threading
from typing import IO, Any, Callable

from .abi import CLI_ID_NULL, MAX_GLOBAL_SHARED_POOLS, MAX_SHARED_AUTH, PAGE_SIZE, SPEC_V0, SPEC_V1
from .client import EMPTY_UUID, Client
from .control import Control
from .dedup import Pcd
from .errors import InvalidArgument, NotPermitted
from .eviction import EphemeralLists
from .hypercall import Hypercall, fast_entry
from .page import DATA, POOL, PageCodec
from .pool import TmemPool
from .store import MEMORY, MemcachedPages, MemoryStore, RemotePage, open_page_bytes
from .store.memory import StoreFactory

DESCRIPTORS_PER_PAGE = 64  # at most this many stored pages per budget page (~64 B each, as Xen's pgp)


class Tmem:
    """A tmem host. See the module docstring; ``do_tmem_op`` is the ABI entry point."""

    def __init__(
        self,
        memory_pages: int,
        accept_v0: bool = False,
        spec_version: int = SPEC_V1,
        *,
        dedup: bool = False,
        tze: bool = False,
        compress: bool = False,
        shared_auth: bool = False,
        shared_auth_strict: bool = False,
        enabled: bool = True,
        store_factory: StoreFactory = MemoryStore,
        store: "str | MemcachedPages" = MEMORY,
    ) -> None:
        if not isinstance(memory_pages, int) or memory_pages < 0:
            raise InvalidArgument(f"memory_pages must be a non-negative int, got {memory_pages!r}")
        if spec_version not in (SPEC_V0, SPEC_V1):
            raise InvalidArgument(f"spec_version must be 0 or 1, got {spec_version!r}")
        self.lock = threading.RLock()
        self.memory_pages = memory_pages
        self.budget_bytes = memory_pages * PAGE_SIZE
        self.max_descriptors = memory_pages * DESCRIPTORS_PER_PAGE
        self.spec_version = spec_version
        self.accepted_versions = frozenset({SPEC_V1, SPEC_V0} if spec_version == SPEC_V1 and accept_v0 else {spec_version})
        self.dedup = dedup
        self.tze = tze and dedup and not compress  # Xen: tze needs dedup and is disabled with compression
        self.compress_default = compress
        self.shared_auth = shared_auth
        # tmemd's variant (docs/trust-model.md): an unauthorized shared NEW_POOL is -EPERM rather than
        # silently private, and TMEM_AUTH may name a client that has no pool yet (a guest about to
        # connect): the grant waits in pending_auth and becomes the client's when it is created.
        self.shared_auth_strict = shared_auth_strict
        self.pending_auth: dict[int, list[tuple[int, int]]] = {}
        self.global_shared_auth = False
        self.store_factory = store_factory
        remote = open_page_bytes(store)
        if remote is not None and dedup:
            raise InvalidArgument("a memcached store cannot be combined with dedup (contents stay in RAM)")
        self.remote_pages = remote  # None: page bytes in RAM
        self.codec = PageCodec(dedup=dedup, tze=self.tze, remote=remote)
        # raw pages in RAM can skip the codec (unless the owner compresses); remote pages cannot
        self.plain = not dedup and remote is None
        self.clients: dict[int, Client] = {}
        self.eviction = EphemeralLists(self.clients)
        self.shared_pools: list[TmemPool | None] = [None] * MAX_GLOBAL_SHARED_POOLS
        self.used_bytes = 0
        self.npages = 0
        self.obj_count = 0
        self.npages_max = 0
        self.obj_count_max = 0
        self.used_bytes_max = 0
        self.alloc_page_failed = 0
        self.tot_good_eph_puts = 0
        self.total_flush_pool = 0
        self.hypercall = Hypercall(self)
        self.control = Control(self)
        self.enabled = enabled  # Xen's tmem boot option: off -> every op is -ENODEV
        # The hot path: one Python frame less per hypercall than the method below.
        self.do_tmem_op = fast_entry(self.hypercall)  # type: ignore[method-assign]

    def __repr__(self) -> str:
        return f"Tmem(memory_pages={self.memory_pages}, used_bytes={self.used_bytes}, pages={self.npages})"

    # --- the ABI --------------------------------------------------------------------------------

    def do_tmem_op(self, client_id: int, op: bytes, page: bytearray | memoryview | None = None) -> int:
        """One hypercall: a raw ``struct tmem_op`` image from ``client_id``; Xen's return code.

        (Instances bind this name to ``hypercall.fast_entry``, which does exactly this.)"""
        return self.hypercall.do_tmem_op(client_id, op, page)

    # --- clients --------------------------------------------------------------------------------

    def client(self, cli_id: int) -> Client:
        """The client with this id, created on first use (as Xen does on a client's first op)."""
        client = self.clients.get(cli_id)
        if client is not None:
            return client
        if not isinstance(cli_id, int) or not 0 <= cli_id < CLI_ID_NULL:
            raise InvalidArgument(f"client id must be in 0..{CLI_ID_NULL - 1}, got {cli_id!r}")
        with self.lock:
            client = self.clients.setdefault(cli_id, Client(self, cli_id))
            self.pending_auth.pop(cli_id, None)  # the client now holds its grants itself
            return client

    def adopt_client(self, cli_id: int, first_op: Callable[[Client], int]) -> int:
        """Run ``first_op`` on a new client and keep the client only if the op succeeds."""
        client = Client(self, cli_id)
        result = first_op(client)
        self.clients[cli_id] = client
        self.pending_auth.pop(cli_id, None)
        return result

    def existing_client(self, cli_id: int) -> Client:
        client = self.clients.get(cli_id)
        if client is None:
            raise NotPermitted(f"no tmem client {cli_id}")  # Xen's control ops answer -1
        return client

    def destroy_client(self, cli_id: int) -> bool:
        """Domain death: free every pool (leave shared ones) and forget the client."""
        with self.lock:
            client = self.clients.get(cli_id)
            if client is None:
                return False
            client.live_migrating = False
            client.invalidated.clear()
            for slot in range(len(client.pools)):
                client.destroy_pool(slot)
            self.eviction.weight_total -= client.weight
            del self.clients[cli_id]
            self.eviction.weights_changed()
            return True

    def set_client_max_pages(self, cli_id: int, max_pages: int | None) -> None:
        """Limit the persistent pages a client may hold (Xen: the domain's max_pages); None = no limit."""
        if max_pages is not None and (not isinstance(max_pages, int) or max_pages < 0):
            raise InvalidArgument(f"max_pages must be None or a non-negative int, got {max_pages!r}")
        with self.lock:
            self.client(cli_id).max_pages = max_pages

    # --- pools and the shared table -------------------------------------------------------------

    def new_pool_object(
        self, owner: Client, pool_id: int, *, persistent: bool, shared: bool, uuid: tuple[int, int], version: int
    ) -> TmemPool:
        return TmemPool(
            self, owner, pool_id, persistent=persistent, shared=shared, uuid=uuid, version=version,
            store=self.store_factory(),
        )

    def join_shared_pool(
        self, client: Client, pool_id: int, uuid: tuple[int, int], *, persistent: bool, version: int
    ) -> TmemPool:
        """The shared pool with this uuid (joined) or a new one in the first free global slot."""
        for pool in self.shared_pools:
            if pool is not None and pool.uuid == uuid:
                pool.sharers.append(client)
                return pool
        if None not in self.shared_pools:
            raise NotPermitted("no free global shared pool slot")
        pool = self.new_pool_object(client, pool_id, persistent=persistent, shared=True, uuid=uuid, version=version)
        self.shared_pools[self.shared_pools.index(None)] = pool
        return pool

    def leave_shared_pool(self, client: Client, pool: TmemPool) -> None:
        """Xen's shared_pool_quit: drop the leaver's objects, hand ownership on, free when last."""
        pool.destroy_objects(only_client=client.cli_id)
        pool.sharers.remove(client)
        if pool.sharers:
            if pool.client is client:
                self._reassign(pool, pool.sharers[0])
            return
        self.shared_pools[self.shared_pools.index(pool)] = None
        pool.destroy_objects()
        pool.dead = True

    def _reassign(self, pool: TmemPool, new_owner: Client) -> None:
        old = pool.client
        if pool.persistent:
            old.pers_count -= pool.npages
            new_owner.pers_count += pool.npages
        else:
            old.eph_count -= pool.npages
            new_owner.eph_count += pool.npages
            new_owner.eph_count_max = max(new_owner.eph_count_max, new_owner.eph_count)
        pool.client = new_owner
        pool.pool_id = new_owner.pools.index(pool)
        if not pool.persistent:
            self.eviction.rebuild_client_lists([old, new_owner])

    # --- memory ---------------------------------------------------------------------------------

    def make_room(self, charge: int, caller: Client | None) -> bool:
        """Evict ephemeral pages until ``charge`` more bytes (and one more descriptor) fit.

        On the common host (no weights, no dedup) ``choose_victim``'s rule is exactly "the
        oldest live page on the global list" (no over-share client, no reprieve), so that
        case is inlined here: on a full host most puts evict one page. test_fast_paths runs
        the same ops through ``choose_victim`` and compares every counter."""
        eviction = self.eviction
        if not self.plain or eviction.weight_total:
            return self._make_room_by_rule(charge, caller)
        queue = eviction.global_list
        while self.used_bytes + charge > self.budget_bytes or self.npages >= self.max_descriptors:
            eviction.evict_attempts += 1
            node = None
            while queue:
                node = queue.popleft()
                if node:  # else a dead descriptor (lazy deletion)
                    break
            if not node:
                self.alloc_page_failed += 1
                return False
            node[POOL].evict(node)
            eviction.evicted_pgs += 1
        return True

    def _make_room_by_rule(self, charge: int, caller: Client | None) -> bool:
        eviction = self.eviction
        while self.used_bytes + charge > self.budget_bytes or self.npages >= self.max_descriptors:
            node = eviction.choose_victim(caller)
            if node is None:
                self.alloc_page_failed += 1
                return False
            node[POOL].evict(node)
            eviction.evicted_pgs += 1
        return True

    def relinquish(self, nbytes: int) -> int:
        """Evict ephemeral pages until ``nbytes`` are freed (TMEMC_FLUSH); the bytes freed."""
        eviction = self.eviction
        eviction.relinq_attempts += 1
        freed = evicted = 0
        while freed < nbytes:
            node = eviction.choose_victim(None)
            if node is None:
                break
            before = self.used_bytes
            node[POOL].evict(node)
            eviction.evicted_pgs += 1
            freed += before - self.used_bytes
            evicted += 1
        eviction.relinq_pgs += evicted
        eviction.max_evicts_per_relinq = max(eviction.max_evicts_per_relinq, evicted)
        return freed

    # --- control, Pythonic (each is also a TMEMC sub-op; see control.py) -------------------------

    def freeze(self, cli_id: int | None = None) -> None:
        """Freeze one client (created on demand, like ``client``) or, with None, all."""
        with self.lock:
            self.control.freeze(self._named(cli_id), True)

    def thaw(self, cli_id: int | None = None) -> None:
        with self.lock:
            self.control.freeze(self._named(cli_id), False)

    def flush(self, kib: int) -> int:
        """Relinquish ``kib`` KiB (rounded up to pages) of ephemeral pages; the KiB freed."""
        with self.lock:
            return self.control.flush(CLI_ID_NULL, kib)

    def set_weight(self, cli_id: int | None, weight: int) -> None:
        with self.lock:
            self.control.set_weight(self._named(cli_id), weight)

    def set_cap(self, cli_id: int | None, cap: int) -> None:
        with self.lock:
            self.control.set_cap(self._named(cli_id), cap)

    def set_compress(self, cli_id: int | None, enabled: bool) -> None:
        with self.lock:
            self.control.set_compress(self._named(cli_id), enabled)

    def _named(self, cli_id: int | None) -> int | None:
        """None (all clients) as is; a client id after creating that client if needed (the
        Python API creates clients on demand; the control hypercall answers -1 instead)."""
        if cli_id is not None:
            self.client(cli_id)
        return cli_id

    def query_freeable_mb(self) -> int:
        with self.lock:
            return self.control.query_freeable_mb()

    def authorize(self, cli_id: int | None, uuid: tuple[int, int], auth: bool = True) -> int:
        """TMEM_AUTH: (de)authorize a client for a shared-pool uuid; None = the global switch."""
        with self.lock:
            return self.control.authorize(CLI_ID_NULL if cli_id is None else self._named(cli_id), uuid, auth)  # type: ignore[arg-type]

    def list_text(self, cli_id: int | None = None, long: bool = False) -> str:
        """TMEMC_LIST's text (G=/S=/C=/P= lines)."""
        from .stats import list_text

        with self.lock:
            return list_text(self, CLI_ID_NULL if cli_id is None else cli_id, long)

    def stats(self) -> dict[str, Any]:
        """The LIST data as a dict (JSON-ready), keyed by Xen's counter names."""
        from .stats import host_stats

        with self.lock:
            return host_stats(self)

    def stats_json(self) -> str:
        return json.dumps(self.stats(), sort_keys=True)

    # --- save / restore (tmemcore/savestream.py, driven through do_tmem_op) ---------------------

    def save(self, client_id: int, fileobj: IO[bytes], live: bool = False) -> int:
        from .savestream import save_client

        return save_client(self, client_id, fileobj, live=live)

    def restore(self, client_id: int, fileobj: IO[bytes], convert: bool = False) -> None:
        """Restore a client from a save stream, all or nothing (savestream.restore_client).

        One transaction under the host lock. A shared pool the stream names may already exist, and
        then the restore joins it; its puts make the restoring client the last client of the objects
        they touch, and a sharer that leaves takes its objects with it (Xen's shared_pool_quit). So a
        rollback first undoes that: it flushes the pages the restore added to existing shared pools
        and gives each touched object back to its previous last client, and only then destroys the
        client, so other clients' pages in those objects survive.
        """
        from .savestream import restore_client

        with self.lock:
            restore_client(_RollbackGuard(self), client_id, fileobj, convert=convert)

    # --- invariants -----------------------------------------------------------------------------

    def check(self) -> None:
        """Assert every cross-structure invariant (tests call this after every step)."""
        with self.lock:
            pools: dict[int, TmemPool] = {}
            for client in self.clients.values():
                client.check()
                for pool in client.pools:
                    if pool is not None:
                        pools[id(pool)] = pool
            for slot, pool in enumerate(self.shared_pools):
                if pool is not None:
                    assert pool.shared and id(pool) in pools, f"shared slot {slot} holds an unreachable pool"
            for cid, table in self.pending_auth.items():
                assert self.shared_auth_strict, "grants for clients that do not exist on a Xen-rule host"
                assert cid not in self.clients, f"client {cid} exists but its grants are still pending"
                assert len(table) == MAX_SHARED_AUTH and any(u != EMPTY_UUID for u in table), table
            for pool in pools.values():
                if pool.shared:
                    assert pool in self.shared_pools, f"{pool!r} is shared but not in the global table"
                pool.check()
            live_eph: dict[int, list[Any]] = {}
            used = npages = nobj = 0
            pcd_refs: dict[int, int] = {}
            for pool in pools.values():
                nobj += pool.obj_count
                for node in pool.live_nodes():
                    npages += 1
                    stored = node[DATA]
                    if type(stored) is not Pcd:
                        used += len(stored)
                    else:
                        if id(stored) not in pcd_refs:
                            used += stored.size
                        pcd_refs[id(stored)] = pcd_refs.get(id(stored), 0) + 1
                    if pool.ephemeral:
                        live_eph[id(node)] = node
            assert used == self.used_bytes, f"byte accounting {self.used_bytes} != stored {used}"
            assert npages == self.npages, f"page count {self.npages} != {npages}"
            assert nobj == self.obj_count, f"object count {self.obj_count} != {nobj}"
            assert self.used_bytes <= self.budget_bytes, "budget exceeded"
            assert self.npages <= self.max_descriptors, "descriptor cap exceeded"
            self.eviction.check(list(self.clients.values()), live_eph)
            self.control.uploads.check()
            if self.remote_pages is not None:
                remote = sum(type(n[DATA]) is RemotePage for p in pools.values() for n in p.live_nodes())
                self.remote_pages.check(remote)
            if self.codec.dedup is not None:
                self.codec.dedup.check(pcd_refs)
            else:
                assert not pcd_refs, "dedup descriptors without dedup"


class _RollbackGuard:
    """``Tmem`` as savestream's ControlHost for one restore: remembers the shared pools as they were
    (their handles and last clients) and undoes the restore's traces in them before ``destroy_client``."""

    def __init__(self, host: Tmem) -> None:
        self.host = host
        self._before = {
            pool: ({oid: set(obj) for oid, obj in pool.objects.items()}, dict(pool.last_client))
            for pool in host.shared_pools if pool is not None
        }

    def destroy_client(self, client_id: int) -> None:
        client = self.host.clients.get(client_id)
        for pool, (handles, last_client) in self._before.items():
            if client is None or pool not in client.pools:
                continue
            for oid in [oid for oid in pool.objects if oid not in handles]:
                pool.flush_object(oid)  # created by the restore: leaving would destroy it anyway
            for oid, indexes in handles.items():
                for index in [i for i in pool.objects.get(oid, {}) if i not in indexes]:
                    pool.flush_page(oid, index)  # a page the restore added to an existing object
                if oid in pool.objects and oid in last_client:
                    pool.last_client[oid] = last_client[oid]  # the object goes back to its last client
        self.host.destroy_client(client_id)

    def __getattr__(self, name: str) -> Any:  # everything else (do_tmem_op, versions) is the host's
        return getattr(self.host, name)
