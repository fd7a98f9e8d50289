"""Eviction: global FIFO, weight-proportional shares, persistence, dedup reprieve, relinquish."""

from __future__ import annotations

from tmemcore import Tmem
from tmemcore.eviction import SLACK

PAGE = 4096


def pg(fill: int) -> bytes:
    return bytes([fill & 0xFF]) * PAGE


def test_budget_full_evicts_oldest_first() -> None:
    t = Tmem(memory_pages=4)
    p = t.client(1).new_pool()
    for i in range(6):
        assert p.put(1, i, pg(i))
        t.check()
    assert [p.get(1, i) is not None for i in range(6)] == [False, False, True, True, True, True]
    g = t.stats()["global"]
    assert g["evicted_pgs"] == 2 and g["evict_attempts"] == 2
    t.check()


def test_ephemeral_budget_is_exactly_memory_pages() -> None:
    t = Tmem(memory_pages=10)
    p = t.client(1).new_pool()
    for i in range(10):
        p.put(1, i, pg(i))
    assert t.stats()["global"]["evicted_pgs"] == 0 and t.npages == 10
    p.put(1, 10, pg(10))
    assert t.npages == 10 and t.stats()["global"]["evicted_pgs"] == 1


def test_over_share_client_evicts_its_own_pages() -> None:
    t = Tmem(memory_pages=6)
    a = t.client(1).new_pool()
    b = t.client(2).new_pool()
    t.set_weight(1, 1)
    t.set_weight(2, 1)
    for i in range(5):
        a.put(1, i, pg(i))  # client 1 holds 5 of 6: over its half
    b.put(2, 0, pg(50))
    a.put(1, 5, pg(5))  # full: client 1 is over its share, so its own oldest page goes
    assert a.get(1, 0) is None and b.get(2, 0) == pg(50)
    t.check()


def test_under_share_client_evicts_global_oldest() -> None:
    t = Tmem(memory_pages=4)
    a = t.client(1).new_pool()
    b = t.client(2).new_pool()
    t.set_weight(1, 1)
    t.set_weight(2, 3)
    for i in range(3):
        a.put(1, i, pg(i))
    b.put(2, 0, pg(9))
    b.put(2, 1, pg(9))  # client 2 (1 of 4 pages, share 3/4) is under: the global oldest goes
    assert a.get(1, 0) is None and b.get(2, 0) == pg(9)
    t.set_weight(2, 0)  # weight 0 never counts as over quota
    assert t.stats()["clients"][1]["weight"] == 0
    t.check()


def test_weights_steer_shares() -> None:
    t = Tmem(memory_pages=40)
    pools = [t.client(c).new_pool() for c in (1, 2)]
    t.set_weight(1, 1)
    t.set_weight(2, 3)
    for i in range(400):
        pools[i % 2].put(7, i, pg(i))
    counts = [t.client(c).eph_count for c in (1, 2)]
    assert sum(counts) == 40 and counts[0] <= 11 and counts[1] >= 29  # ~1:3
    t.check()


def test_persistent_put_evicts_ephemeral_never_persistent() -> None:
    t = Tmem(memory_pages=3)
    c = t.client(1)
    eph, pers = c.new_pool(), c.new_pool(persistent=True)
    eph.put(1, 0, pg(1))
    pers.put(2, 0, pg(2))
    pers.put(2, 1, pg(3))
    assert pers.put(2, 2, pg(4))  # evicts the ephemeral page
    assert eph.get(1, 0) is None
    assert pers.put(2, 3, pg(5)) is False  # only persistent pages left: ENOMEM
    assert eph.put(1, 1, pg(6)) is False  # nothing evictable for an ephemeral put either
    t.check()


def test_dedup_pages_get_one_reprieve() -> None:
    t = Tmem(memory_pages=3, dedup=True)
    p = t.client(1).new_pool()
    p.put(1, 0, pg(7))
    p.put(1, 1, pg(7))  # same content as page 0: one pcd, two references
    p.put(1, 2, pg(8))
    p.put(1, 3, pg(9))
    t.check()
    p.put(1, 4, pg(10))  # over budget: 0 and 1 are reprieved once, then 2 is evicted
    t.check()
    assert p.get(1, 2) is None
    assert t.stats()["global"]["deduped_puts"] == 1
    p.put(1, 5, pg(11))  # the list is now 3, 0*, 1*, 4: page 3 goes
    t.check()
    evicted = t.stats()["global"]["evicted_pgs"]
    p.put(1, 6, pg(12))  # 0* goes but frees nothing (1 still refers), so 1* goes too
    t.check()
    assert t.stats()["global"]["evicted_pgs"] == evicted + 2
    assert p.get(1, 0) is None and p.get(1, 1) is None and p.get(1, 4) == pg(10)


def test_flush_relinquishes_kib() -> None:
    t = Tmem(memory_pages=8)
    p = t.client(1).new_pool()
    for i in range(8):
        p.put(1, i, pg(i))
    assert t.flush(5) == 8  # 5 KiB rounds up to 2 pages = 8 KiB
    assert t.npages == 6
    assert t.flush(1000) == 24  # everything there was
    g = t.stats()["global"]
    assert g["relinq_attempts"] == 2 and g["relinq_pgs"] == 8 and g["max_evicts_per_relinq"] == 6
    t.check()


def test_lazy_lists_are_compacted() -> None:
    t = Tmem(memory_pages=4)
    p = t.client(1).new_pool()
    for i in range(20 * SLACK):
        p.put(1, i, pg(i))
        assert p.get(1, i) == pg(i)  # exclusive get: one dead entry per round
    assert len(t.eviction.global_list) <= 2 * t.eviction.global_eph_count + SLACK + 1
    assert len(t.client(1).eph_pages) <= 2 * t.client(1).eph_count + SLACK + 1
    assert len(t.client(1).eph_pages) <= SLACK + 2
    t.check()


def test_equals_lru_of_budget_for_single_private_pool() -> None:
    """put-on-evict/exclusive-get is a FIFO of the budget: a model check (the lab relies on it)."""
    import random

    from collections import OrderedDict

    rng = random.Random(5)
    t = Tmem(memory_pages=16)
    p = t.client(1).new_pool()
    model: OrderedDict[int, int] = OrderedDict()
    for step in range(3000):
        key = rng.randrange(40)
        if rng.random() < 0.5:
            p.put(1, key, pg(step))
            model.pop(key, None)
            model[key] = step & 0xFF
            if len(model) > 16:
                model.popitem(last=False)
        else:
            got = p.get(1, key)
            want = model.pop(key, None)
            assert (got is None) == (want is None) and (got is None or got[0] == want)
    t.check()


def test_client_lists_exist_only_while_a_weight_is_set() -> None:
    """The per-client FIFOs serve the weight rule only: built from the global order when the
    first weight is set, dropped when the last weight returns to 0."""
    t = Tmem(memory_pages=6)
    a = t.client(1).new_pool()
    b = t.client(2).new_pool()
    for i in range(3):
        a.put(1, i, pg(i))
        b.put(1, i, pg(10 + i))
    assert not t.eviction.by_client and not t.client(1).eph_pages
    t.set_weight(2, 1)
    assert t.eviction.by_client
    assert [n[0] for n in t.client(1).eph_pages] == [pg(0), pg(1), pg(2)]
    assert [n[0] for n in t.client(2).eph_pages] == [pg(10), pg(11), pg(12)]
    t.check()
    b.put(2, 0, pg(20))  # full: client 2 holds 3 of 6 pages with all the weight -> not over share
    assert a.get(1, 0) is None and b.get(1, 0) == pg(10)  # so the global oldest went (1's page 0)
    t.set_weight(1, 3)  # now 2 has weight 1 of 4 but holds 3 of 5 pages: over its share
    a.put(1, 4, pg(4))
    b.put(2, 1, pg(21))  # full again (6 pages) and 2 is over its share: its own oldest goes
    assert b.get(1, 1) is None and a.get(1, 1) == pg(1)
    t.check()
    t.set_weight(None, 0)
    assert not t.eviction.by_client and not t.client(1).eph_pages and not t.client(2).eph_pages
    t.check()
