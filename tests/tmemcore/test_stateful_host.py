"""A whole-host model test: several clients, private and shared pools of both kinds, pool and
client destruction, freeze/thaw, weights, relinquish, live-save control ops. Whatever a get
returns must be the last data put for that handle (or None where pages may be lost), and
``check()`` must hold after every step."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tmemcore import Tmem, abi
from tmemcore.errors import Frozen, NotPermitted

PAGE = 4096
CLIENTS = st.integers(1, 2)
SLOTS = st.integers(0, 1)
KEYS = st.tuples(st.integers(0, 2), st.integers(0, 2))
FILLS = st.integers(0, 3)


def content(fill: int) -> bytes:
    return bytes([fill + 1]) * 64 + bytes(PAGE - 64)


class HostMachine(RuleBasedStateMachine):
    @initialize(pages=st.integers(2, 10), mode=st.sampled_from(["plain", "compress", "dedup", "tze"]))
    def setup(self, pages: int, mode: str) -> None:
        self.tmem = Tmem(memory_pages=pages, compress=mode == "compress", dedup=mode in ("dedup", "tze"),
                         tze=mode == "tze")
        # model: (uuid-or-(cid, slot)) pool identity -> {(oid, index): fill}; persistent pools lossless
        self.model: dict[object, dict[tuple[int, int], int]] = {}
        self.persistent: dict[object, bool] = {}

    def _identity(self, cid: int, slot: int) -> object | None:
        client = self.tmem.clients.get(cid)
        pool = client.pools[slot] if client is not None else None
        return None if pool is None else id(pool)

    @rule(cid=CLIENTS, persistent=st.booleans(), shared=st.booleans(), uuid=st.just(0))
    def new_pool(self, cid: int, persistent: bool, shared: bool, uuid: int) -> None:
        try:
            pool = self.tmem.client(cid).new_pool(persistent=persistent, shared=shared, uuid=(uuid, 9))
        except NotPermitted:
            return
        ident = self._identity(cid, pool.pool_id)
        self.model.setdefault(ident, {})
        self.persistent.setdefault(ident, pool.persistent)

    @rule(cid=CLIENTS, slot=SLOTS, key=KEYS, fill=FILLS)
    def put(self, cid: int, slot: int, key: tuple[int, int], fill: int) -> None:
        ident = self._identity(cid, slot)
        if ident is None:
            return
        pool = self.tmem.client(cid).handle(slot)
        try:
            stored = pool.put(key[0], key[1], content(fill))
        except Frozen:
            # refused only as a new put: the page is not there (the model may still list an
            # ephemeral page that eviction or relinquish took: it is then known to be gone)
            owner = self.tmem.client(cid).pools[slot].client  # Xen: pool->client, the owner
            assert owner.frozen and not self._still_there(ident, key)
            assert self.persistent[ident] is False or key not in self.model[ident]
            self.model[ident].pop(key, None)
            return
        if stored:
            self.model[ident][key] = fill
        else:
            self.model[ident].pop(key, None)

    @rule(cid=CLIENTS, slot=SLOTS, key=KEYS)
    def get(self, cid: int, slot: int, key: tuple[int, int]) -> None:
        ident = self._identity(cid, slot)
        if ident is None:
            return
        pool = self.tmem.client(cid).handle(slot)
        got = pool.get(*key)
        want = self.model[ident].get(key)
        if self.persistent[ident]:
            assert got == (None if want is None else content(want))
        elif got is None:
            self.model[ident].pop(key, None)
        else:
            assert want is not None and got == content(want)
            if not pool.shared:
                del self.model[ident][key]

    @rule(cid=CLIENTS, slot=SLOTS, key=KEYS)
    def flush(self, cid: int, slot: int, key: tuple[int, int]) -> None:
        ident = self._identity(cid, slot)
        if ident is not None:
            self.tmem.client(cid).handle(slot).flush_page(*key)
            self.model[ident].pop(key, None)

    @rule(cid=CLIENTS, slot=SLOTS)
    def destroy_pool(self, cid: int, slot: int) -> None:
        ident = self._identity(cid, slot)
        if ident is None:
            return
        pool = self.tmem.client(cid).handle(slot)
        if self.tmem.client(cid).live_migrating:
            return
        shared = pool.shared
        pool.destroy()
        if not shared or not any(
            p is not None and id(p) == ident for c in self.tmem.clients.values() for p in c.pools
        ):
            self.model.pop(ident, None)
        else:  # a sharer left: the objects it touched last are gone; forget what we cannot know
            self.model[ident] = {k: v for k, v in self.model[ident].items()
                                 if self._still_there(ident, k)}

    def _still_there(self, ident: object, key: tuple[int, int]) -> bool:
        for client in self.tmem.clients.values():
            for pool in client.pools:
                if pool is not None and id(pool) == ident:
                    return pool.peek(*key) is not None
        return False

    @rule(cid=CLIENTS)
    def destroy_client(self, cid: int) -> None:
        if self.tmem.destroy_client(cid):
            live = {id(p) for c in self.tmem.clients.values() for p in c.pools if p is not None}
            for ident in list(self.model):
                if ident not in live:
                    del self.model[ident]
                else:
                    self.model[ident] = {k: v for k, v in self.model[ident].items() if self._still_there(ident, k)}

    @rule(cid=CLIENTS, frozen=st.booleans())
    def freeze(self, cid: int, frozen: bool) -> None:
        if cid in self.tmem.clients and not self.tmem.clients[cid].live_migrating:
            (self.tmem.freeze if frozen else self.tmem.thaw)(cid)

    @rule(cid=CLIENTS, weight=st.integers(0, 3))
    def weight(self, cid: int, weight: int) -> None:
        if cid in self.tmem.clients:
            self.tmem.set_weight(cid, weight)

    @rule(kib=st.integers(0, 16))
    def relinquish(self, kib: int) -> None:
        self.tmem.flush(kib)

    @precondition(lambda self: hasattr(self, "tmem"))
    @rule(cid=CLIENTS, live=st.booleans())
    def save_cycle(self, cid: int, live: bool) -> None:
        begin = self.tmem.do_tmem_op(0, abi.control_record(abi.TMEMC_SAVE_BEGIN, cid, arg1=int(live)))
        if begin != 1:
            return
        buf = bytearray(abi.HANDLE_V1.size + PAGE)
        for slot in range(16):
            while self.tmem.do_tmem_op(0, abi.control_record(abi.TMEMC_SAVE_GET_NEXT_PAGE, cid, arg1=len(buf),
                                                             pool_id=slot), buf) == 1:
                pass
        assert self.tmem.do_tmem_op(0, abi.control_record(abi.TMEMC_SAVE_END, cid)) == 0

    @invariant()
    def consistent(self) -> None:
        if hasattr(self, "tmem"):
            self.tmem.check()


TestHost = HostMachine.TestCase
TestHost.settings = settings(max_examples=200, stateful_step_count=60, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])
