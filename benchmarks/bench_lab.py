"""Lab speed: trace replay engines against an OrderedDict LRU replay measured in the same run.

Engines, each replaying page cache N + tmem M on the same trace:

- baseline   pure-Python OrderedDict LRU of N+M pages (one level), the notes' reference loop
- model      OrderedDict first level + OrderedDict FIFO victim level (guestfs.lab.simulate.replay_model)
- stack      the REAL PageCache -> CleanCache -> InProcessTransport -> tmemcore.Tmem, page bytes
             stamped and checked (replay_stack)
- fast       the exact one-pass LRU curve (every size at once; timed per configuration = one pass)
- belady     Belady/MIN at N+M (numpy next-use + heap)
- inlined    the stack's required work with no layers: one function doing what a request through
             the real stack must do (stamp built and every hit compared, a cachetools-storage LRU
             with its per-file index and counters, frontend tracking that skips gets of pages never
             put, one v1 record packed per host op, the real host's Tmem.do_tmem_op). What the four
             real layers cost on top of it is the price of going through them (Python frames)

Targets (the lab issue): stack >= 200k req/s, fast >= 1M req/s, Belady >= 500k req/s.
Prints medians of --repeat runs and ratios against the baseline. The trace is ARC OLTP when the
shared traces are present (else a seeded Zipf trace of the same length).

    .venv/bin/python benchmarks/bench_lab.py [--repeat 3] [--stack-requests 300000] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import platform
import pstats
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from guestfs.lab.mrc import LruCurve  # noqa: E402
from guestfs.lab.opt import belady_hits  # noqa: E402
from guestfs.lab.simulate import replay_model, replay_stack  # noqa: E402
from guestfs.lab.traces import Trace, load_trace, shared_traces_dir, synthetic_zipf  # noqa: E402


def ordered_dict_lru(keys: list[int], size: int) -> int:
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


def inlined_required_work(keys: np.ndarray, page_cache_pages: int, tmem_pages: int) -> int:
    """The stack's per-request work in one loop (see the module doc); returns its hits."""
    from cachetools import LRUCache

    from guestfs.lab.simulate import INDEX_BITS, INDEX_MASK, PAGE_BYTES, stamp_units, tmem_class
    from guestfs.pagecache import _lru_internals
    from tmemcore.abi import GEN_V1, TMEM_GET_PAGE, TMEM_PUT_PAGE, new_pool_record, pool_flags

    tmem = tmem_class()(memory_pages=tmem_pages)
    op = tmem.do_tmem_op
    pool = op(1, new_pool_record(pool_flags()), None)
    record = GEN_V1.pack
    frame = bytearray(PAGE_BYTES)
    lru = LRUCache(maxsize=page_cache_pages)
    pages, order = _lru_internals(lru)  # cachetools' own storage, as guestfs.pagecache uses it
    cached: dict[int, set[int]] = {}  # page cache: cached indexes per file (for invalidation)
    tracked: dict[int, set[int]] = {}  # frontend: indexes possibly in tmem per file
    hits = misses = evictions = puts = succ_gets = failed_gets = wrong = 0
    repeat = PAGE_BYTES // 16
    for key, unit in zip(keys.tolist(), stamp_units(keys.astype(np.int64).view(np.uint64))):
        expected = unit * repeat
        data = pages.get(key)
        if data is not None:
            order.move_to_end(key)
            hits += 1
            wrong += data != expected
            continue
        misses += 1
        file_no, index = key >> INDEX_BITS, key & INDEX_MASK
        data = expected
        maybe = tracked.get(file_no)
        if maybe is not None and index in maybe:
            maybe.discard(index)
            if op(1, record(TMEM_GET_PAGE, pool, file_no + 1, 0, 0, index, 0, 0, 0, 0), frame) == 1:
                succ_gets += 1
                data = bytes(frame)
                wrong += data != expected
            else:
                failed_gets += 1
        else:
            failed_gets += 1
        if len(pages) >= page_cache_pages:
            old, _ = order.popitem(False)
            old_page = pages.pop(old)
            old_file, old_index = old >> INDEX_BITS, old & INDEX_MASK
            cached[old_file].discard(old_index)
            evictions += 1
            puts += 1
            tracked.setdefault(old_file, set()).add(old_index)
            op(1, record(TMEM_PUT_PAGE, pool, old_file + 1, 0, 0, old_index, 0, 0, 0, 0), old_page)
        pages[key] = data
        order[key] = None
        cached.setdefault(file_no, set()).add(index)
    assert wrong == 0 and hits + misses == keys.size
    return hits + succ_gets


def timed(repeat: int, func) -> tuple[float, object]:
    """Median seconds of ``repeat`` runs, and the last result."""
    times = []
    result = None
    for _ in range(repeat):
        started = time.perf_counter()
        result = func()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def layer_costs(pairs: int = 50_000) -> dict[str, float]:
    """Microseconds per put+get pair at each layer of the stack (no profiler overhead)."""
    from cachetools import LRUCache

    from guestfs.lab.simulate import FileKeys, build_guest, tmem_class
    from tmemcore.abi import TMEM_GET_PAGE, TMEM_PUT_PAGE, gen_record, new_pool_record, pool_flags

    page = bytearray(4096)
    data = bytes(4096)
    out: dict[str, float] = {}

    tmem = tmem_class()(memory_pages=1024)
    pool = tmem.do_tmem_op(1, new_pool_record(pool_flags()), None)
    puts = [gen_record(TMEM_PUT_PAGE, pool, 7, i) for i in range(pairs)]
    gets = [gen_record(TMEM_GET_PAGE, pool, 7, i) for i in range(pairs)]
    op = tmem.do_tmem_op
    started = time.perf_counter()
    for put, get in zip(puts, gets):
        op(1, put, page)
        op(1, get, page)
    out["tmemcore do_tmem_op PUT+GET (record prebuilt)"] = (time.perf_counter() - started) / pairs * 1e6

    pythonic = tmem_class()(memory_pages=1024).client(1).new_pool()
    started = time.perf_counter()
    for i in range(pairs):
        pythonic.put(7, i, data)
        pythonic.get(7, i)
    out["tmemcore Pythonic pool.put+pool.get (no records)"] = (time.perf_counter() - started) / pairs * 1e6

    guest = build_guest(1, tmem_class()(memory_pages=1024))
    key = FileKeys()(0)
    cleancache = guest.cleancache
    started = time.perf_counter()
    for i in range(pairs):
        cleancache.put_page(key, i, data)
        cleancache.get_page(key, i)
    out["CleanCache put_page+get_page (+ records + host)"] = (time.perf_counter() - started) / pairs * 1e6

    guest = build_guest(1, tmem_class()(memory_pages=1024))
    cache = guest.cache
    loader = lambda: data  # noqa: E731
    cache.get_or_load(key, 0, loader)
    cache.get_or_load(key, 1, loader)  # evicts 0 to tmem
    started = time.perf_counter()
    for i in range(pairs):
        cache.get_or_load(key, i & 1, loader)  # always a tmem hit that evicts the other page
    out["PageCache.get_or_load tmem hit + eviction put (all layers)"] = (time.perf_counter() - started) / pairs * 1e6

    lru: LRUCache = LRUCache(maxsize=1)
    started = time.perf_counter()
    for i in range(pairs):
        lru[i] = data
    out["cachetools.LRUCache insert with eviction (for scale)"] = (time.perf_counter() - started) / pairs * 1e6
    return out


def pick_trace() -> Trace:
    root = shared_traces_dir()
    if root is not None and (root / "arc" / "OLTP.lis.zst").is_file():
        return load_trace(root / "arc" / "OLTP.lis.zst")
    return synthetic_zipf(914_145, 186_880, 0.9, seed=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="runs per engine (median reported)")
    parser.add_argument("--page-cache", type=int, default=1000, help="first-chance pages N")
    parser.add_argument("--tmem", type=int, default=4000, help="tmem pages M")
    parser.add_argument("--stack-requests", type=int, default=300_000,
                        help="requests replayed through the real stack (it is the slow engine)")
    parser.add_argument("--profile", action="store_true", help="cProfile the stack replay and print the top costs")
    args = parser.parse_args(argv)

    trace = pick_trace()
    n, m = args.page_cache, args.tmem
    keys = trace.keys
    items = keys.tolist()
    head = keys[: args.stack_requests]
    head_items = head.tolist()
    print(f"# bench_lab: trace {trace.name} ({trace.requests:,} requests), N={n} M={m}, "
          f"python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")

    base_s, base_hits = timed(args.repeat, lambda: ordered_dict_lru(items, n + m))
    base_head_s, _ = timed(args.repeat, lambda: ordered_dict_lru(head_items, n + m))
    model_s, model = timed(args.repeat, lambda: replay_model(keys, n, m))
    fast_s, curve = timed(args.repeat, lambda: LruCurve.of(keys))
    opt_s, opt_hits = timed(args.repeat, lambda: belady_hits(keys, n + m))
    stack_s, stack = timed(max(1, args.repeat - 1), lambda: replay_stack(head, n, m))
    inlined_s, inlined_hits = timed(max(1, args.repeat - 1), lambda: inlined_required_work(head, n, m))

    base_rate = trace.requests / base_s
    base_head_rate = head.size / base_head_s
    rows = [
        ("OrderedDict LRU(N+M) (baseline)", base_rate, base_rate, ""),
        ("model: OrderedDict LRU + FIFO victim", trace.requests / model_s, base_rate, ">= 1M"),
        ("fast: exact LRU curve, one pass (all sizes)", trace.requests / fast_s, base_rate, ">= 1M"),
        ("Belady at N+M", trace.requests / opt_s, base_rate, ">= 500k"),
        (f"stack: real PageCache+CleanCache+Tmem ({head.size:,} req)", head.size / stack_s, base_head_rate,
         ">= 200k"),
        ("inlined: the stack's required work, no layers (floor)", head.size / inlined_s, base_head_rate, ""),
    ]
    print(f"{'engine':<58} {'req/s':>12} {'x baseline':>11}  target")
    for name, rate, reference, target in rows:
        print(f"{name:<58} {rate:>12,.0f} {rate / reference:>11.2f}  {target}")

    # The engines must agree before their speed means anything.
    assert base_hits == curve.hits(n + m) == model.hits, (base_hits, curve.hits(n + m), model.hits)
    head_curve = LruCurve.of(head)
    assert stack.hits == head_curve.hits(n + m) == inlined_hits and stack.wrong_bytes == 0, (stack, inlined_hits)
    print(f"# agreement: LRU(N+M) hits {base_hits:,} = fast = model; stack = fast = inlined on its {head.size:,} requests; "
          f"Belady {opt_hits:,} ({100 * opt_hits / trace.requests:.2f} %)")

    if args.profile:
        print("# per-layer cost of one page-cache miss that hits tmem (put of the evicted page + get), us:")
        for name, micros in layer_costs().items():
            print(f"#   {name:<52} {micros:6.2f}")
        profiler = cProfile.Profile()
        profiler.enable()
        replay_stack(keys[:100_000], n, m)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(18)
    return 0


if __name__ == "__main__":
    np.seterr(all="raise")
    sys.exit(main())
