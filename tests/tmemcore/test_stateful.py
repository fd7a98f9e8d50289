"""Model-based tests (Hypothesis stateful), ``check()`` after every step.

* ephemeral private pool = a dict with losses: anything returned equals the model, gets
  are exclusive, and after a miss no hit comes back without a new put;
* shared ephemeral pool = the same, but gets keep the page;
* persistent pool = a lossless dict (within the client's limit).
Each machine runs on a plain host and on hosts with compression, dedup and dedup+TZE.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tmemcore import Tmem

PAGE = 4096
OIDS = st.sampled_from([0, (1 << 64) + 1, (1 << 191) | 5])
INDEXES = st.integers(0, 2)
FILLS = st.integers(0, 5)  # few distinct contents, so dedup shares pages
CONFIGS = st.sampled_from(["plain", "compress", "dedup", "tze"])

SETTINGS = settings(max_examples=200, stateful_step_count=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def content(fill: int) -> bytes:
    # half-zero pages so TZE trims them and compression helps
    return bytes([fill + 1]) * (PAGE // 2) + bytes(PAGE // 2)


def host(config: str, pages: int) -> Tmem:
    return Tmem(memory_pages=pages, compress=config == "compress", dedup=config in ("dedup", "tze"),
                tze=config == "tze")


class EphemeralMachine(RuleBasedStateMachine):
    shared = False

    @initialize(config=CONFIGS, pages=st.integers(2, 12))
    def setup(self, config: str, pages: int) -> None:
        self.tmem = host(config, pages)
        self.pool = self.tmem.client(1).new_pool(shared=self.shared, uuid=(7, 7))
        self.other = self.tmem.client(2).new_pool()  # a second client competing for the budget
        self.model: dict[tuple[int, int], int] = {}

    @rule(oid=OIDS, index=INDEXES, fill=FILLS)
    def put(self, oid: int, index: int, fill: int) -> None:
        if self.pool.put(oid, index, content(fill)):
            self.model[(oid, index)] = fill
        else:
            self.model.pop((oid, index), None)  # refused: a duplicate's old copy is gone too

    @rule(index=INDEXES, fill=FILLS)
    def other_client_puts(self, index: int, fill: int) -> None:
        self.other.put(9, index, content(fill))

    @rule(oid=OIDS, index=INDEXES)
    def get(self, oid: int, index: int) -> None:
        got = self.pool.get(oid, index)
        want = self.model.get((oid, index))
        if got is None:
            self.model.pop((oid, index), None)  # lost (evicted): must stay lost
            return
        assert want is not None, "a hit for a handle that was never put (or already got/lost)"
        assert got == content(want)
        if not self.shared:
            del self.model[(oid, index)]  # private gets are exclusive

    @rule(oid=OIDS, index=INDEXES)
    def flush_page(self, oid: int, index: int) -> None:
        self.pool.flush_page(oid, index)
        self.model.pop((oid, index), None)

    @rule(oid=OIDS)
    def flush_object(self, oid: int) -> None:
        self.pool.flush_object(oid)
        for key in [k for k in self.model if k[0] == oid]:
            del self.model[key]

    @invariant()
    def consistent(self) -> None:
        if hasattr(self, "tmem"):
            self.tmem.check()


class SharedEphemeralMachine(EphemeralMachine):
    shared = True


class PersistentMachine(RuleBasedStateMachine):
    @initialize(config=CONFIGS, limit=st.sampled_from([None, 3, 8]))
    def setup(self, config: str, limit: int | None) -> None:
        self.tmem = host(config, 6)
        self.pool = self.tmem.client(1).new_pool(persistent=True)
        self.eph = self.tmem.client(1).new_pool()
        self.tmem.set_client_max_pages(1, limit)
        self.limit = limit
        self.model: dict[tuple[int, int], int] = {}

    @rule(oid=OIDS, index=INDEXES, fill=FILLS)
    def put(self, oid: int, index: int, fill: int) -> None:
        stored = self.pool.put(oid, index, content(fill))
        dup = (oid, index) in self.model
        room = min(6, self.limit if self.limit is not None else 6)  # the limit and the host budget
        if len(self.model) - dup < room:
            assert stored, "a persistent put within the limit and the budget must succeed"
        if stored:
            self.model[(oid, index)] = fill
        else:
            self.model.pop((oid, index), None)

    @rule(index=st.integers(0, 40), fill=FILLS)
    def ephemeral_pressure(self, index: int, fill: int) -> None:
        self.eph.put(3, index, content(fill))

    @rule(oid=OIDS, index=INDEXES)
    def get(self, oid: int, index: int) -> None:
        want = self.model.get((oid, index))
        got = self.pool.get(oid, index)
        assert got == (None if want is None else content(want)), "persistent pools are lossless"

    @rule(oid=OIDS, index=INDEXES)
    def flush_page(self, oid: int, index: int) -> None:
        assert self.pool.flush_page(oid, index) == ((oid, index) in self.model)
        self.model.pop((oid, index), None)

    @rule(oid=OIDS)
    def flush_object(self, oid: int) -> None:
        keys = [k for k in self.model if k[0] == oid]
        assert self.pool.flush_object(oid) == len(keys)
        for key in keys:
            del self.model[key]

    @invariant()
    def consistent(self) -> None:
        if hasattr(self, "tmem"):
            self.tmem.check()
            assert self.pool.npages == len(self.model)


TestEphemeral = EphemeralMachine.TestCase
TestEphemeral.settings = SETTINGS
TestSharedEphemeral = SharedEphemeralMachine.TestCase
TestSharedEphemeral.settings = SETTINGS
TestPersistent = PersistentMachine.TestCase
TestPersistent.settings = SETTINGS
