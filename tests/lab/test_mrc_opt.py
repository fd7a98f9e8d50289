"""The fast path: exact LRU curves (stack distances), the victim identity, and Belady."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guestfs.lab.mrc import LruCurve, count_less_in_ranges, stack_distances
from guestfs.lab.opt import belady_hits
from guestfs.lab.simulate import fast_counts, replay_model
from guestfs.lab.traces import load_trace, synthetic_zipf


def lru_hits(keys: list[int], size: int) -> int:
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for key in keys:
        if key in cache:
            cache.move_to_end(key)
            hits += 1
        else:
            cache[key] = None
            if len(cache) > size:
                cache.popitem(last=False)
    return hits


def belady_reference(keys: list[int], size: int) -> int:
    """Textbook MIN: scan the future for every eviction (quadratic; tiny traces only)."""
    cache: set[int] = set()
    hits = 0
    for t, key in enumerate(keys):
        if key in cache:
            hits += 1
            continue
        if len(cache) >= size:
            def next_use(k: int) -> int:
                for u in range(t + 1, len(keys)):
                    if keys[u] == k:
                        return u
                return len(keys) + 1
            cache.remove(max(cache, key=next_use))
        cache.add(key)
    return hits


traces = st.lists(st.integers(0, 30), min_size=1, max_size=300)


@settings(max_examples=150, deadline=None)
@given(traces, st.integers(1, 40))
def test_lru_curve_matches_ordered_dict(keys: list[int], size: int) -> None:
    curve = LruCurve.of(np.array(keys, dtype=np.int64))
    assert curve.hits(size) == lru_hits(keys, size)


@settings(max_examples=100, deadline=None)
@given(traces, st.integers(1, 20), st.integers(0, 20))
def test_victim_identity_model(keys: list[int], first: int, second: int) -> None:
    arr = np.array(keys, dtype=np.int64)
    model = replay_model(arr, first, second, exclusive=True)
    fast = fast_counts(LruCurve.of(arr), first, second)
    assert (model.page_cache_hits, model.tmem_hits, model.misses) == (fast.page_cache_hits, fast.tmem_hits, fast.misses)


@settings(max_examples=100, deadline=None)
@given(traces, st.integers(1, 12))
def test_belady_matches_textbook_min(keys: list[int], size: int) -> None:
    arr = np.array(keys, dtype=np.int64)
    hits = belady_hits(arr, size)
    assert hits == belady_reference(keys, size)
    assert lru_hits(keys, size) <= hits <= len(keys) - len(set(keys))


def test_count_less_in_ranges_brute_force() -> None:
    rng = np.random.default_rng(3)
    values = rng.integers(0, 50, 400)
    lo = rng.integers(0, 400, 300)
    hi = np.minimum(lo + rng.integers(0, 100, 300), 400)
    bound = rng.integers(0, 60, 300)
    got = count_less_in_ranges(values, lo, hi, bound)
    want = [int((values[a:b] < x).sum()) for a, b, x in zip(lo, hi, bound)]
    assert got.tolist() == want


def test_stack_distances_small_example() -> None:
    # a b c a b b d a: distinct keys since the last use: -1 -1 -1 2(b c) 2(c a) 0 -1 2(b d)
    keys = np.array([1, 2, 3, 1, 2, 2, 4, 1], dtype=np.int64)
    assert stack_distances(keys).tolist() == [-1, -1, -1, 2, 2, 0, -1, 2]


def test_synthetic_curve_against_replay_at_several_sizes() -> None:
    trace = synthetic_zipf(50_000, 5000, 0.8, seed=7)
    curve = LruCurve.of(trace.keys)
    items = trace.keys.tolist()
    for size in (1, 50, 500, 2000, 6000):
        assert curve.hits(size) == lru_hits(items, size)
    assert curve.hits(10**9) == trace.requests - trace.unique()


def test_model_shared_is_a_valid_split() -> None:
    trace = synthetic_zipf(20_000, 3000, 0.9, seed=2)
    shared = replay_model(trace.keys, 200, 800, exclusive=False)
    exclusive = replay_model(trace.keys, 200, 800, exclusive=True)
    assert shared.page_cache_hits == exclusive.page_cache_hits  # the first level is the same LRU
    assert 0 < shared.tmem_hits < exclusive.tmem_hits  # duplicates waste the second level


@pytest.mark.traces
def test_oltp_lru_reference_hit_ratios(traces_dir: Path) -> None:
    trace = load_trace(traces_dir / "arc" / "OLTP.lis.zst")
    curve = LruCurve.of(trace.keys)
    got = [round(100 * curve.hit_ratio(size), 2) for size in (1000, 2000, 5000, 10000, 15000)]
    assert got == [32.83, 42.47, 53.65, 60.70, 64.63]


@pytest.mark.traces
def test_oltp_belady_reference(traces_dir: Path) -> None:
    trace = load_trace(traces_dir / "arc" / "OLTP.lis.zst")
    assert round(100 * belady_hits(trace.keys, 1000) / trace.requests, 2) == 53.61
    assert round(100 * belady_hits(trace.keys, 15000) / trace.requests, 2) == 75.14


@pytest.mark.traces
def test_lirs_lru_and_belady_reference(traces_dir: Path) -> None:
    """hitrate-notes.md §3.4 LIRS table, LRU and Belady columns."""
    table = {"multi2": [(100, 6.73, 35.39), (1600, 48.36, 71.28)], "sprite": [(500, 78.30, 87.88)],
             "ps": [(300, 16.33, 54.27)], "2_pools": [(1000, 54.41, 68.52)]}
    for name, rows in table.items():
        trace = load_trace(traces_dir / "lirs" / f"{name}.trace.gz")
        curve = LruCurve.of(trace.keys)
        for size, lru, opt in rows:
            assert round(100 * curve.hit_ratio(size), 2) == lru, (name, size)
            assert round(100 * belady_hits(trace.keys, size) / trace.requests, 2) == opt, (name, size)



@pytest.mark.traces
def test_cloudphysics_reference_points(traces_dir: Path) -> None:
    """hitrate-notes.md §2.2 (4 KiB pages, reads and writes) and §3.4 (lbn keys, miss ratios)."""
    pages = load_trace(traces_dir / "cloudphysics" / "cloudPhysicsIO.csv", include_writes=True)
    curve = LruCurve.of(pages.keys)
    assert (round(curve.hit_ratio(40_000), 4), round(curve.hit_ratio(80_000), 4)) == (0.1391, 0.3744)
    lbns = load_trace(traces_dir / "cloudphysics" / "cloudPhysicsIO.oracleGeneral.bin")
    curve = LruCurve.of(lbns.keys)
    got = [round(curve.miss_ratio(int(48_974 * f)), 4) for f in (0.001, 0.01, 0.1, 0.4)]
    assert got == [0.9030, 0.8380, 0.8049, 0.6328]
