"""Clients (Xen's ``client``: one per domain): 16 pool slots, weight, cap, frozen,
compression, persistent page limit, shared-pool authorizations, save/restore state.

A client's pools share one spec version, fixed by its first pool (and forgotten when its
last pool goes): its gen records must then have that version's length (56 or 40 bytes).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from .abi import (
    MAX_POOLS_PER_DOMAIN,
    MAX_SHARED_AUTH,
    PAGE_SHIFT,
    TMEM_POOL_PAGESIZE_MASK,
    TMEM_POOL_PAGESIZE_SHIFT,
    TMEM_POOL_PERSIST,
    TMEM_POOL_PRECOMPRESSED,
    TMEM_POOL_RESERVED_BITS,
    TMEM_POOL_SHARED,
    flags_version,
    pool_flags,
)
from .errors import InvalidArgument, NoMemory, NotPermitted
from .page import CompressStats
from .pool import Pool, TmemPool

if TYPE_CHECKING:
    from .tmem import Tmem

WORD_ALL_ONES = (1 << 64) - 1
EMPTY_UUID = (WORD_ALL_ONES, WORD_ALL_ONES)  # an empty authorization slot / "no uuid"
EMPTY_AUTH_TABLE = (EMPTY_UUID,) * MAX_SHARED_AUTH


class Client:
    """One tmem client. Counters use Xen's names."""

    def __init__(self, host: "Tmem", cli_id: int) -> None:
        self.host = host
        self.cli_id = cli_id
        self.pools: list[TmemPool | None] = [None] * MAX_POOLS_PER_DOMAIN
        self._version: int | None = None
        self.record_size = 0
        self.weight = 0
        self.cap = 0
        self.compress = host.compress_default
        self.frozen = False
        self.was_frozen = False
        self.live_migrating = False
        self.shared_auth_required = host.shared_auth
        # grants TMEM_AUTH made before this client existed (strict hosts only) are its first ones
        self.auth_uuids: list[tuple[int, int]] = list(host.pending_auth.get(cli_id, EMPTY_AUTH_TABLE))
        self.eph_pages: deque[list[Any]] = deque()  # FIFO of ephemeral descriptors (eviction.py)
        self.eph_count = 0
        self.eph_count_max = 0
        self.compact_at = 256  # eviction.compact_limit: when eph_pages is next squeezed
        self.pers_count = 0  # persistent pages charged to this client
        self.max_pages: int | None = None  # persistent page limit (Xen: domain max_pages)
        self.invalidated: list[tuple[int, int, int]] = []  # (pool_id, oid, index) flushed while migrating
        self.inv_cursor = 0
        self.compress_stats = CompressStats()
        self.total_cycles = 0
        self.succ_eph_gets = 0
        self.succ_pers_puts = 0
        self.succ_pers_gets = 0

    def __repr__(self) -> str:
        return f"Client({self.cli_id}, pools={[p.pool_id for p in self.pools if p]})"

    @property
    def version(self) -> int | None:
        """The spec version of this client's pools (None until its first pool)."""
        return self._version

    @version.setter
    def version(self, version: int | None) -> None:
        self._version = version
        # the gen-record length this client must use (0: none yet); read on every hypercall
        self.record_size = 0 if version is None else (56 if version == 1 else 40)

    # --- pools ----------------------------------------------------------------------------------

    def new_pool(
        self,
        persistent: bool = False,
        shared: bool = False,
        uuid: tuple[int, int] | None = None,
        version: int | None = None,
    ) -> Pool:
        """Create (or join, for a shared uuid) a pool; raises NotPermitted like NEW_POOL's -EPERM."""
        if version is None:
            version = self.version if self.version is not None else self.host.spec_version
        if uuid is None:
            uuid = (0, 0)
        if not (len(uuid) == 2 and all(isinstance(w, int) and 0 <= w <= WORD_ALL_ONES for w in uuid)):
            raise InvalidArgument(f"a pool uuid is two u64 words (lo, hi), got {uuid!r}")
        if version not in (0, 1):
            raise InvalidArgument(f"spec version must be 0 or 1, got {version!r}")
        flags = pool_flags(persistent=persistent, shared=shared, version=version)
        with self.host.lock:
            pool_id = self.create_pool(flags, (uuid[0], uuid[1]))
            return self.handle(pool_id)

    def handle(self, pool_id: int) -> Pool:
        """A Pythonic handle on an existing slot."""
        with self.host.lock:
            pool = self.pools[pool_id] if 0 <= pool_id < MAX_POOLS_PER_DOMAIN else None
            if pool is None:
                raise InvalidArgument(f"client {self.cli_id} has no pool {pool_id}")
            return Pool(self, pool_id, pool)

    def create_pool(self, flags: int, uuid: tuple[int, int], pool_id: int | None = None) -> int:
        """NEW_POOL (``pool_id`` None: lowest free slot) or RESTORE_NEW (explicit slot).

        Validation order as Xen 4.1 (tmem-abi.md §9.2): spec version, page size,
        PRECOMPRESSED, reserved bits (v1), free slot; then shared-pool resolution.
        """
        host = self.host
        version = flags_version(flags)
        if version not in host.accepted_versions:
            raise NotPermitted(f"unsupported spec version {version} (host accepts {sorted(host.accepted_versions)})")
        if self.version is not None and version != self.version:
            raise NotPermitted(f"client {self.cli_id} already uses spec version {self.version}, not {version}")
        pagebits = (flags >> TMEM_POOL_PAGESIZE_SHIFT) & TMEM_POOL_PAGESIZE_MASK
        if pagebits != PAGE_SHIFT - 12:
            raise NotPermitted(f"unsupported page size {1 << (pagebits + 12)}")
        if flags & TMEM_POOL_PRECOMPRESSED:
            raise NotPermitted("precompressed pools are not supported")
        if version == 1 and flags & TMEM_POOL_RESERVED_BITS:
            raise NotPermitted(f"reserved flag bits set: {flags & TMEM_POOL_RESERVED_BITS:#x}")
        persistent = bool(flags & TMEM_POOL_PERSIST)
        shared = bool(flags & TMEM_POOL_SHARED) and self._may_share(uuid)
        if flags & TMEM_POOL_SHARED and not shared and pool_id is None and uuid != EMPTY_UUID \
                and host.shared_auth_strict:
            # tmemd's rule: a guest that asked to share and was not authorized is told so, instead of
            # Xen's silently private pool (which it could take for a shared one). RESTORE_NEW (pool_id
            # given, from the control domain) keeps Xen's rule.
            raise NotPermitted(f"client {self.cli_id} is not authorized for the shared pool {uuid_text(uuid)}")
        if shared and pool_id is None:
            # joining a shared pool this client already holds returns its slot (Xen would
            # list the client twice as a sharer and file the pool in a second slot)
            for slot, held in enumerate(self.pools):
                if held is not None and held.shared and held.uuid == uuid:
                    return slot
        if pool_id is None:
            pool_id = next((i for i, p in enumerate(self.pools) if p is None), None)
            if pool_id is None:
                raise NotPermitted(f"client {self.cli_id} has no free pool slot")
        elif not 0 <= pool_id < MAX_POOLS_PER_DOMAIN or self.pools[pool_id] is not None:
            raise NotPermitted(f"pool slot {pool_id} of client {self.cli_id} is invalid or in use")
        if shared and any(held is not None and held.shared and held.uuid == uuid for held in self.pools):
            raise NotPermitted(f"client {self.cli_id} already shares the pool with uuid {uuid}")
        if shared:
            pool = host.join_shared_pool(self, pool_id, uuid, persistent=persistent, version=version)
        else:
            # a private pool has no uuid (Xen keeps one for shared pools only): LIST, SAVE_GET_POOL_UUID
            # and the save stream show (0, 0), also for a guest that asked to share and was refused
            pool = host.new_pool_object(self, pool_id, persistent=persistent, shared=False, uuid=(0, 0),
                                        version=version)
        self.pools[pool_id] = pool
        self.version = version
        return pool_id

    def _may_share(self, uuid: tuple[int, int]) -> bool:
        """Xen silently makes a shared pool private for uuid (-1,-1) or an unauthorized uuid."""
        if uuid == EMPTY_UUID:
            return False
        if self.shared_auth_required and not self.host.global_shared_auth:
            return uuid in self.auth_uuids
        return True

    def destroy_pool(self, pool_id: int) -> bool:
        """DESTROY_POOL: True if a pool was destroyed (or left, if shared)."""
        pool = self.pools[pool_id]
        if pool is None:
            return False
        if self.live_migrating:
            # Xen: "can't destroy pool while client is live-migrating" (nothing done)
            return False
        self.pools[pool_id] = None
        if pool.shared:
            self.host.leave_shared_pool(self, pool)
        else:
            pool.destroy_objects()
            pool.dead = True
        self.host.total_flush_pool += 1
        if all(p is None for p in self.pools):
            self.version = None
        return True

    # --- shared-pool authorization (TMEM_AUTH) ------------------------------------------------

    def authorize(self, uuid: tuple[int, int], auth: bool) -> int:
        """Xen's tmemc_shared_pool_auth for one client: 1 done, 0 nothing to deauthorize."""
        return grant(self.auth_uuids, self.cli_id, uuid, auth)

    # --- invariants -----------------------------------------------------------------------------

    def check(self) -> None:
        pers = 0
        for slot, pool in enumerate(self.pools):
            if pool is None:
                continue
            if pool.client is self:
                assert pool.pool_id == slot, f"{self!r}: owned pool filed in slot {slot} says {pool.pool_id}"
                if pool.persistent:
                    pers += pool.npages
            else:
                assert pool.shared and self in pool.sharers, f"{self!r}: slot {slot} holds a foreign private pool"
        assert pers == self.pers_count, f"{self!r}: persistent count {self.pers_count} != {pers}"
        if self.version is not None:
            assert any(self.pools), f"{self!r}: version kept without pools"
        assert self.live_migrating or not self.invalidated, f"{self!r}: invalidated list outside a live save"


def grant(table: list[tuple[int, int]], cli_id: int, uuid: tuple[int, int], auth: bool) -> int:
    """(De)authorize ``uuid`` in a 16-slot authorization table: 1 done, 0 nothing to deauthorize,
    NoMemory when all slots are taken."""
    if uuid in table:
        if not auth:
            table[table.index(uuid)] = EMPTY_UUID
        return 1
    if not auth:
        return 0
    if EMPTY_UUID not in table:
        raise NoMemory(f"client {cli_id} has no free authorization slot")
    table[table.index(EMPTY_UUID)] = uuid
    return 1


def uuid_text(uuid: tuple[int, int]) -> str:
    """A pool uuid as libxc writes it: "hi" word first, 8-4-4-4-12 hex digits."""
    digits = f"{uuid[1]:016x}{uuid[0]:016x}"
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"
