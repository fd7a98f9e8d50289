"""Belady's MIN (OPT) for fixed-size pages: the hit-count bound no replacement policy can beat.

Demand paging as in libCacheSim's ``Belady``: every missed page is inserted, and when the cache
is full the cached page whose next use is farthest in the future is evicted first.

Speed trick: a cached key is represented by the *position of its next request* (unique per
request, computed with numpy in ``mrc.previous_and_next``; a key never used again gets the
unique value ``N + t``). Then

- "is the key of request t cached?" is ``t in resident``;
- the eviction victim is simply the heap maximum: entries left behind by hits are positions
  ``<= t`` and therefore smaller than every live entry, so the top of the heap is always live
  while anything is cached (no lazy-deletion loop).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

import numpy as np

from .mrc import previous_and_next

CHUNK = 1 << 16  # progress callback granularity (requests)


def next_use(keys: np.ndarray) -> np.ndarray:
    """Position of the next request of the same key; ``N + t`` (unique, beyond the trace) if none."""
    n = keys.size
    _, nxt = previous_and_next(np.asarray(keys, dtype=np.int64))
    never = nxt >= n
    nxt[never] = n + np.flatnonzero(never)
    return nxt


def belady_hits(
    keys: np.ndarray,
    size: int,
    *,
    next_positions: np.ndarray | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Hits of Belady's MIN with a cache of ``size`` pages (cold start)."""
    if size <= 0:
        return 0
    nxt = next_use(keys) if next_positions is None else next_positions
    future = nxt.tolist()
    resident: set[int] = set()
    heap: list[int] = []  # negated next-use positions: a max-heap
    push, pop = heapq.heappush, heapq.heappop
    hits = 0
    n = len(future)
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        for t in range(start, stop):
            if t in resident:
                hits += 1
                resident.remove(t)
            elif len(resident) >= size:
                resident.remove(-pop(heap))
            upcoming = future[t]
            resident.add(upcoming)
            push(heap, -upcoming)
        if progress is not None:
            progress(stop - start)
    return hits


def belady_curve(keys: np.ndarray, sizes: list[int], progress: Callable[[int], None] | None = None) -> dict[int, int]:
    """Belady hits at several sizes, sharing one next-use computation."""
    nxt = next_use(keys)
    return {size: belady_hits(keys, size, next_positions=nxt, progress=progress) for size in sizes}
