"""Exact one-pass LRU miss-ratio curves (Mattson stack distances), vectorised with numpy.

The LRU stack distance of request t (key k, previous request of k at p) is the number of
distinct keys requested strictly between p and t. A request hits an LRU cache of C pages iff
that distance is < C, so one histogram of distances gives the hit count at every size.

Counting distinct keys in (p, t) without a per-request loop: position j in (p, t) contributes
a distinct key iff it is the last request of its key before t, i.e. ``next[j] > t``. So

    distance(t) = (t - p - 1) - #{ j in (p, t) : next[j] < t }

and the second term is a 2-D dominance count, answered for ALL requests at once by walking a
wavelet matrix over the ``next`` array bit by bit (about log2(N) vectorised numpy passes, each
O(N); the matrix is built level by level alongside the queries, so memory stays O(N)).

The victim-cache identity (hitrate-notes.md §2.2): an LRU first-chance cache of N pages with an
exclusive FIFO victim cache of M pages behind it hits exactly as often as LRU(N+M), with the
first level taking exactly LRU(N)'s hits. ``LruCurve.two_level(N, M)`` returns those counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def previous_and_next(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every request: index of the previous request of the same key (-1 if none) and of the
    next one (``len(keys)`` if none)."""
    n = keys.size
    order = np.argsort(keys, kind="stable")  # equal keys end up adjacent, in time order
    sorted_keys = keys[order]
    same = sorted_keys[1:] == sorted_keys[:-1]
    earlier, later = order[:-1][same], order[1:][same]
    prev = np.full(n, -1, dtype=np.int64)
    nxt = np.full(n, n, dtype=np.int64)
    prev[later] = earlier
    nxt[earlier] = later
    return prev, nxt


def count_less_in_ranges(values: np.ndarray, lo: np.ndarray, hi: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """For each query q: #{ j in [lo[q], hi[q]) : values[j] < bound[q] } (values >= 0).

    A wavelet matrix walked top bit first; each level is a stable partition of the current
    sequence by that bit plus a prefix count of zeros, and every query descends one level per
    pass, all queries at once.
    """
    index_type = np.int32 if values.size < 2**31 - 1 else np.int64
    top = int(max(int(values.max(initial=0)), int(bound.max(initial=0)))).bit_length()
    current = values
    left, right = lo.astype(index_type), hi.astype(index_type)
    found = np.zeros(lo.size, dtype=np.int64)
    for bit in range(top - 1, -1, -1):
        ones = ((current >> bit) & 1).astype(bool)
        zeros_before = np.empty(current.size + 1, dtype=index_type)
        zeros_before[0] = 0
        np.cumsum(~ones, out=zeros_before[1:])
        total_zeros = zeros_before[-1]
        bound_bit = ((bound >> bit) & 1).astype(bool)
        left_zeros, right_zeros = zeros_before[left], zeros_before[right]
        # bound has a 1 here: every value with a 0 here (same higher bits) is smaller.
        found += np.where(bound_bit, right_zeros - left_zeros, 0)
        left = np.where(bound_bit, total_zeros + (left - left_zeros), left_zeros)
        right = np.where(bound_bit, total_zeros + (right - right_zeros), right_zeros)
        current = np.concatenate((current[~ones], current[ones]))
    return found


def stack_distances(keys: np.ndarray) -> np.ndarray:
    """LRU stack distance per request (distinct other keys since the previous request of the
    same key); -1 for a first (cold) request."""
    n = keys.size
    prev, nxt = previous_and_next(keys)
    distances = np.full(n, -1, dtype=np.int64)
    reuse = np.flatnonzero(prev >= 0)
    if reuse.size:
        p = prev[reuse]
        nested = count_less_in_ranges(nxt, p + 1, reuse, reuse)
        distances[reuse] = (reuse - p - 1) - nested
    return distances


@dataclass(frozen=True)
class LruCurve:
    """Hit counts of LRU at every cache size, from one pass over a trace."""

    requests: int
    unique: int
    cumulative_hits: np.ndarray  # cumulative_hits[d] = requests with stack distance <= d

    @classmethod
    def of(cls, keys: np.ndarray) -> "LruCurve":
        distances = stack_distances(np.asarray(keys, dtype=np.int64))
        reused = distances[distances >= 0]
        histogram = np.bincount(reused) if reused.size else np.zeros(1, dtype=np.int64)
        return cls(int(keys.size), int(keys.size - reused.size), np.cumsum(histogram))

    def hits(self, size: int) -> int:
        """Hits of an LRU cache of ``size`` pages (cold start, whole trace)."""
        if size <= 0:
            return 0
        top = self.cumulative_hits.size - 1
        return int(self.cumulative_hits[min(size - 1, top)])

    def hit_ratio(self, size: int) -> float:
        return self.hits(size) / self.requests if self.requests else 0.0

    def miss_ratio(self, size: int) -> float:
        return 1.0 - self.hit_ratio(size)

    def hits_at(self, sizes: np.ndarray) -> np.ndarray:
        sizes = np.asarray(sizes, dtype=np.int64)
        top = self.cumulative_hits.size - 1
        picked = self.cumulative_hits[np.clip(sizes - 1, 0, top)]
        return np.where(sizes > 0, picked, 0)

    def two_level(self, first_chance: int, victim: int) -> dict[str, int]:
        """Counts of an LRU first-chance cache with an exclusive FIFO victim cache behind it."""
        first_hits = self.hits(first_chance)
        total_hits = self.hits(first_chance + victim)
        return {
            "requests": self.requests,
            "page_cache_hits": first_hits,
            "tmem_hits": total_hits - first_hits,
            "misses": self.requests - total_hits,
        }

    def working_set_size(self) -> int:
        """The smallest cache that reaches the maximal (compulsory-limited) hit count."""
        return int(self.cumulative_hits.size)

    def default_sizes(self, points: int = 24) -> list[int]:
        """Log-spaced sizes from 1 page to the working set."""
        top = max(self.working_set_size(), 2)
        grid = np.unique(np.geomspace(1, top, num=points).round().astype(np.int64))
        return [int(v) for v in grid]
