"""tmemcore host benchmark: PUT+GET pairs of 4 KiB pages per second, and memory per page.

Measured in the same run, same workload, same capacity C (pages):
  * ``OrderedDict`` LRU (a minimal class with put/get methods)   -- the baseline
  * the same LRU fed through a 4 KiB guest frame (each put stores a copy of the frame, each
    hit is copied into the frame): the copies a faithful ABI must make, so this row is the
    floor for the ABI configuration (with C = 4096 pages the copies touch ~16 MiB, which is
    memory-bound on the reference machine)
  * ``cachetools.LRUCache``
  * a locked OrderedDict: the same LRU behind what any thread-safe Pythonic API pays per call
    (argument validation, a lock, an exclusive get) and nothing of tmem's bookkeeping: the floor
    for the Pythonic configuration
  * tmemcore, Pythonic API: ``pool.put`` / ``pool.get`` on a private ephemeral pool
  * tmemcore, ABI: ``Tmem.do_tmem_op`` with raw 56-byte records (prebuilt, as a guest
    would hand them over) and a 4 KiB guest frame

Workload: pair i puts key i mod 2C and gets key i - C/2 (even i: usually a hit) or
i - 3C/2 (odd i: usually evicted already), so the hit path, the miss path and the
eviction path all run. Each configuration runs ``--rounds`` times; medians and
percentiles are printed, with ratios to the OrderedDict baseline.

Guest read pattern: microseconds per ``do_tmem_op`` for an exclusive GET hit followed by a
PUT of the page back (what the guest's FUSE read path does per tmem hit).

Memory: tracemalloc bytes per stored page (page bytes included) after filling C pages
with distinct content, and again after churning 4C more pairs (steady state: lazy FIFO
entries included). Target: <= 8 % over 4096 bytes.

Usage: python benchmarks/bench_core.py [--pages 4096] [--pairs 40000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import threading
import time
import tracemalloc
from collections import OrderedDict
from collections.abc import Callable

import cachetools

from tmemcore import Tmem, abi

PAGE = abi.PAGE_SIZE
OID = 0x1234
OID_LIMIT = (1 << 192) - 1  # the all-ones oid is the save-stream terminator
INDEX_MAX = 0xFFFFFFFF


class OrderedDictLru:
    """The baseline: an LRU of fixed capacity over an OrderedDict."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.data: OrderedDict[object, bytes] = OrderedDict()

    def put(self, key: object, value: bytes) -> None:
        data = self.data
        data[key] = value
        data.move_to_end(key)
        if len(data) > self.capacity:
            data.popitem(last=False)

    def get(self, key: object) -> bytes | None:
        value = self.data.get(key)
        if value is not None:
            self.data.move_to_end(key)
        return value


def key_pairs(capacity: int, pairs: int) -> list[tuple[int, int]]:
    span = 2 * capacity
    return [(i % span, (i - (capacity // 2 if i % 2 == 0 else 3 * capacity // 2)) % span) for i in range(pairs)]


def run_ordered_dict(capacity: int, keys: list[tuple[int, int]], pages: list[bytes]) -> float:
    lru = OrderedDictLru(capacity)
    put, get = lru.put, lru.get
    start = time.perf_counter()
    for n, (k_put, k_get) in enumerate(keys):
        put((OID, k_put), pages[n & 63])
        get((OID, k_get))
    return time.perf_counter() - start


def run_ordered_dict_copies(capacity: int, keys: list[tuple[int, int]], pages: list[bytes]) -> float:
    lru = OrderedDictLru(capacity)
    put, get = lru.put, lru.get
    frame_in, frame_out = bytearray(pages[0]), bytearray(PAGE)
    start = time.perf_counter()
    for k_put, k_get in keys:
        put((OID, k_put), bytes(frame_in))
        got = get((OID, k_get))
        if got is not None:
            memoryview(frame_out)[:] = got
    return time.perf_counter() - start


def run_locked_ordered_dict(capacity: int, keys: list[tuple[int, int]], pages: list[bytes]) -> float:
    data: OrderedDict[tuple[int, int], bytes] = OrderedDict()
    lock = threading.Lock()
    acquire, release = lock.acquire, lock.release

    def valid(oid: object, index: object) -> bool:
        return type(oid) is int and type(index) is int and 0 <= oid < OID_LIMIT and 0 <= index <= INDEX_MAX

    def put(oid: int, index: int, page: bytes) -> bool:
        if type(page) is not bytes or len(page) != PAGE or not valid(oid, index):
            raise ValueError("bad page or key")
        acquire()
        try:
            key = (oid, index)
            data[key] = page
            data.move_to_end(key)
            if len(data) > capacity:
                data.popitem(last=False)
            return True
        finally:
            release()

    def get(oid: int, index: int) -> bytes | None:
        if not valid(oid, index):
            raise ValueError("bad key")
        acquire()
        try:
            return data.pop((oid, index), None)  # exclusive, as a private ephemeral pool's get
        finally:
            release()

    start = time.perf_counter()
    for n, (k_put, k_get) in enumerate(keys):
        put(OID, k_put, pages[n & 63])
        get(OID, k_get)
    return time.perf_counter() - start


def run_cachetools(capacity: int, keys: list[tuple[int, int]], pages: list[bytes]) -> float:
    cache: cachetools.LRUCache[object, bytes] = cachetools.LRUCache(maxsize=capacity)
    get = cache.get
    start = time.perf_counter()
    for n, (k_put, k_get) in enumerate(keys):
        cache[(OID, k_put)] = pages[n & 63]
        get((OID, k_get))
    return time.perf_counter() - start


def run_pythonic(capacity: int, keys: list[tuple[int, int]], pages: list[bytes]) -> float:
    tmem = Tmem(memory_pages=capacity)
    pool = tmem.client(1).new_pool()
    put, get = pool.put, pool.get
    start = time.perf_counter()
    for n, (k_put, k_get) in enumerate(keys):
        put(OID, k_put, pages[n & 63])
        get(OID, k_get)
    elapsed = time.perf_counter() - start
    tmem.check()
    return elapsed


def run_abi(capacity: int, keys: list[tuple[int, int]], pages: list[bytes]) -> float:
    tmem = Tmem(memory_pages=capacity)
    pool_id = tmem.do_tmem_op(1, abi.new_pool_record(abi.pool_flags()))
    span = 2 * capacity
    put_rec = [abi.gen_record(abi.TMEM_PUT_PAGE, pool_id, OID, k) for k in range(span)]
    get_rec = [abi.gen_record(abi.TMEM_GET_PAGE, pool_id, OID, k) for k in range(span)]
    frame_in, frame_out = bytearray(pages[0]), bytearray(PAGE)
    op = tmem.do_tmem_op
    start = time.perf_counter()
    for k_put, k_get in keys:
        op(1, put_rec[k_put], frame_in)
        op(1, get_rec[k_get], frame_out)
    elapsed = time.perf_counter() - start
    tmem.check()
    return elapsed


RUNNERS: dict[str, Callable[[int, list[tuple[int, int]], list[bytes]], float]] = {
    "OrderedDict LRU": run_ordered_dict,
    "OrderedDict + copies": run_ordered_dict_copies,
    "cachetools.LRUCache": run_cachetools,
    "locked OrderedDict": run_locked_ordered_dict,
    "tmemcore Pythonic": run_pythonic,
    "tmemcore ABI": run_abi,
}


def guest_read_pattern(objects: int, rounds: int) -> float:
    """Microseconds per hypercall for what the guest's FUSE read path does on a tmem hit: an
    exclusive GET of a page, then a PUT of it back, one page per object (so each GET empties
    and removes its object and each PUT recreates it), through ``Tmem.do_tmem_op``."""
    tmem = Tmem(memory_pages=2 * objects)
    op = tmem.do_tmem_op
    pool_id = op(1, abi.new_pool_record(abi.pool_flags()))
    puts = [abi.gen_record(abi.TMEM_PUT_PAGE, pool_id, OID + k, 0) for k in range(objects)]
    gets = [abi.gen_record(abi.TMEM_GET_PAGE, pool_id, OID + k, 0) for k in range(objects)]
    frame = bytearray(os.urandom(PAGE))
    for record in puts:
        op(1, record, frame)
    start = time.perf_counter()
    for _ in range(rounds):
        for get, put in zip(gets, puts):
            op(1, get, frame)
            op(1, put, frame)
    elapsed = time.perf_counter() - start
    assert tmem.npages == objects
    tmem.check()
    return elapsed / (2 * rounds * objects) * 1e6


def memory_per_page(capacity: int, churn: int) -> dict[str, tuple[float, float]]:
    """(bytes per page after filling, after churning) for the baseline and the host."""
    results: dict[str, tuple[float, float]] = {}
    for name in ("OrderedDict LRU", "tmemcore Pythonic"):
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        if name == "OrderedDict LRU":
            lru = OrderedDictLru(capacity)
            put: Callable[[int, bytes], object] = lambda k, d: lru.put((OID, k), d)  # noqa: E731
            get: Callable[[int], object] = lambda k: lru.get((OID, k))  # noqa: E731
        else:
            tmem = Tmem(memory_pages=capacity)
            pool = tmem.client(1).new_pool()
            put = lambda k, d: pool.put(OID, k, d)  # noqa: E731
            get = lambda k: pool.get(OID, k)  # noqa: E731
        for k in range(capacity):
            put(k, os.urandom(PAGE))
        filled = (tracemalloc.get_traced_memory()[0] - base) / capacity
        for k_put, k_get in key_pairs(capacity, churn):
            put(k_put + capacity, os.urandom(PAGE))
            get(k_get + capacity)
        for k in range(capacity):  # back to full capacity with fresh pages: steady state at C pages
            put(10 * capacity + k, os.urandom(PAGE))
        stored = len(lru.data) if name == "OrderedDict LRU" else tmem.npages
        assert stored == capacity, stored
        steady = (tracemalloc.get_traced_memory()[0] - base) / stored
        tracemalloc.stop()
        results[name] = (filled, steady)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=4096, help="capacity C in 4 KiB pages")
    parser.add_argument("--pairs", type=int, default=40000, help="PUT+GET pairs per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    pages = [os.urandom(PAGE) for _ in range(64)]
    keys = key_pairs(args.pages, args.pairs)
    samples: dict[str, list[float]] = {name: [] for name in RUNNERS}
    for _ in range(args.rounds):
        for name, runner in RUNNERS.items():  # interleaved so load changes hit all alike
            gc.collect()
            samples[name].append(args.pairs / runner(args.pages, keys, pages))
    print(f"# bench_core: {args.pairs} PUT+GET pairs x {args.rounds} rounds, capacity {args.pages} pages")
    print(f"# {platform.python_implementation()} {platform.python_version()} on {platform.machine()}, "
          f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    base = statistics.median(samples["OrderedDict LRU"])
    floor = statistics.median(samples["OrderedDict + copies"])
    print(f"{'configuration':22} {'median pairs/s':>15} {'min':>10} {'max':>10} {'baseline/this':>14} "
          f"{'copies/this':>12}")
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"{name:22} {median:15,.0f} {min(values):10,.0f} {max(values):10,.0f} {base / median:13.2f}x "
              f"{floor / median:11.2f}x")
    guest = sorted(guest_read_pattern(2048, 10) for _ in range(args.rounds))
    print(f"guest read pattern (exclusive GET hit + PUT back, 2048 objects): "
          f"median {statistics.median(guest):.2f} us per do_tmem_op (min {guest[0]:.2f})")
    print()
    mem = memory_per_page(args.pages, 4 * args.pages)
    print(f"{'memory per page':22} {'filled B':>10} {'overhead':>9} {'steady B':>10} {'overhead':>9}")
    for name, (filled, steady) in mem.items():
        print(f"{name:22} {filled:10.0f} {100 * (filled / PAGE - 1):8.1f}% {steady:10.0f} {100 * (steady / PAGE - 1):8.1f}%")


if __name__ == "__main__":
    main()
