"""Replay a page trace through a two-level cache: the REAL guest stack, or reference models.

Engines (all return a ``SimResult`` with the same counters):

- ``replay_stack``  the real first-chance ``PageCache`` -> ``CleanCache`` frontend ->
                    ``InProcessTransport`` -> ``tmemcore.Tmem`` host (no FUSE). Every page's bytes
                    are stamped with its key and checked on every hit, so a run also proves that
                    no wrong bytes were served (``wrong_reads``/``wrong_bytes`` must be 0).
- ``replay_model``  an OrderedDict LRU first level with an LRU/FIFO second level, exclusive (a get
                    moves the page up) or non-exclusive (a get keeps the copy, as a shared tmem
                    pool does). The baseline the benchmark compares with.
- ``fast_counts``   the closed form from the exact LRU curve (victim identity), see ``mrc``.

Trace keys become (file, page index) pairs: file = key >> 16, index = key & 0xFFFF, so every
synthetic file is at most 256 MiB and the index fits tmem's u32.
"""

from __future__ import annotations

import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PAGE_BYTES = 4096
INDEX_BITS = 16
INDEX_MASK = (1 << INDEX_BITS) - 1
U64 = (1 << 64) - 1
_STAMP = struct.Struct("<QQ")


def stamp_page(key: int) -> bytes:
    """The 4096 bytes a simulated page holds: (key, ~key) as two LE u64, repeated 256 times."""
    key &= U64
    return _STAMP.pack(key, key ^ U64) * (PAGE_BYTES // _STAMP.size)


def stamp_units(unsigned: np.ndarray) -> list[bytes]:
    """Each key's 16-byte stamp unit (key, ~key as two LE u64) for an array of uint64 keys, in a
    few numpy calls: ``stamp_page(key)`` is its unit repeated 256 times."""
    units = np.empty((unsigned.size, 2), dtype="<u8")
    units[:, 0] = unsigned
    units[:, 1] = ~unsigned
    return units.view(f"V{_STAMP.size}").ravel().tolist()  # void items become bytes, none stripped


def stamp_key(unit: bytes) -> int:
    """The key a stamp unit was made from."""
    return _STAMP.unpack(unit)[0]


def wrong_byte_count(data: bytes, key: int) -> int:
    """How many bytes of ``data`` differ from the page of ``key`` (slow path, only on mismatch)."""
    expected = stamp_page(key)
    if len(data) != len(expected):
        return max(len(data), len(expected))
    a = np.frombuffer(data, dtype=np.uint8)
    b = np.frombuffer(expected, dtype=np.uint8)
    return int(np.count_nonzero(a != b))


@dataclass
class SimResult:
    """Counters of one replay. Ratios are fractions of all requests."""

    trace: str
    engine: str
    page_cache_pages: int
    tmem_pages: int
    requests: int
    page_cache_hits: int
    tmem_hits: int
    misses: int
    wrong_reads: int = 0
    wrong_bytes: int = 0
    seconds: float = 0.0
    belady_pages: int | None = None
    belady_hits: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def hits(self) -> int:
        return self.page_cache_hits + self.tmem_hits

    def ratio(self, count: int) -> float:
        return count / self.requests if self.requests else 0.0

    @property
    def hit_ratio(self) -> float:
        return self.ratio(self.hits)

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def check(self) -> None:
        assert self.page_cache_hits + self.tmem_hits + self.misses == self.requests, self
        assert min(self.page_cache_hits, self.tmem_hits, self.misses, self.wrong_reads, self.wrong_bytes) >= 0

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row.update(
            hits=self.hits,
            hit_ratio=self.hit_ratio,
            page_cache_hit_ratio=self.ratio(self.page_cache_hits),
            tmem_hit_ratio=self.ratio(self.tmem_hits),
            miss_ratio=self.ratio(self.misses),
            requests_per_second=self.requests_per_second,
        )
        if self.belady_hits is not None:
            row["belady_hit_ratio"] = self.ratio(self.belady_hits)
        return row


Progress = Callable[[int], None] | None
CHUNK = 1 << 14


# --- reference models -------------------------------------------------------------------------


def replay_model(
    keys: np.ndarray,
    page_cache_pages: int,
    tmem_pages: int,
    *,
    exclusive: bool = True,
    trace: str = "trace",
    progress: Progress = None,
) -> SimResult:
    """OrderedDict model of LRU(first chance) + FIFO/LRU(second chance) (no page bytes)."""
    if page_cache_pages < 1 or tmem_pages < 0:
        raise ValueError("page cache needs at least 1 page and tmem at least 0 pages")
    started = time.perf_counter()
    first: OrderedDict[int, None] = OrderedDict()
    second: OrderedDict[int, None] = OrderedDict()
    first_hits = second_hits = 0
    items = keys.tolist()
    for start in range(0, len(items), CHUNK):
        for key in items[start : start + CHUNK]:
            if key in first:
                first.move_to_end(key)
                first_hits += 1
                continue
            if key in second:
                second_hits += 1
                if exclusive:
                    del second[key]
                else:
                    second.move_to_end(key)  # a shared-pool get refreshes the page's LRU position
            first[key] = None
            if len(first) > page_cache_pages:
                victim, _ = first.popitem(last=False)
                if tmem_pages:
                    second[victim] = None
                    second.move_to_end(victim)
                    if len(second) > tmem_pages:
                        second.popitem(last=False)
        if progress is not None:
            progress(len(items[start : start + CHUNK]))
    requests = len(items)
    result = SimResult(
        trace,
        "model-exclusive" if exclusive else "model-shared",
        page_cache_pages,
        tmem_pages,
        requests,
        first_hits,
        second_hits,
        requests - first_hits - second_hits,
        seconds=time.perf_counter() - started,
    )
    result.check()
    return result


def fast_counts(curve: Any, page_cache_pages: int, tmem_pages: int, *, trace: str = "trace") -> SimResult:
    """Counts of page cache N + exclusive tmem M from an ``LruCurve`` (victim identity)."""
    counts = curve.two_level(page_cache_pages, tmem_pages)
    result = SimResult(
        trace,
        "fast",
        page_cache_pages,
        tmem_pages,
        counts["requests"],
        counts["page_cache_hits"],
        counts["tmem_hits"],
        counts["misses"],
    )
    result.check()
    return result


# --- the real guest stack ---------------------------------------------------------------------


@dataclass
class StackParts:
    """The real stack's pieces for one guest, built for a replay (no FUSE, no files)."""

    cache: Any  # guestfs.pagecache.PageCache
    cleancache: Any  # guestfs.cleancache.CleanCache
    tmem: Any  # tmemcore.Tmem | None


def build_guest(
    page_cache_pages: int,
    tmem: Any,
    *,
    client_id: int = 1,
    abi: str = "v1",
    fold: str = "xxh64",
    tracked_pages: int = 1 << 20,
) -> StackParts:
    """PageCache -> CleanCache -> InProcessTransport -> ``tmem`` (NullTransport when tmem is None)."""
    from guestfs.cleancache import CleanCache
    from guestfs.pagecache import PageCache
    from guestfs.transport import InProcessTransport, NullTransport

    transport = InProcessTransport(tmem, client_id=client_id) if tmem is not None else NullTransport()
    # The frontend tracks every page it may have put (a superset of what the host holds); keep
    # that bound above the trace's working set so its tracked-object flushes never kick in.
    cleancache = CleanCache(transport, abi=abi, fold=fold, max_tracked_pages=tracked_pages)
    cleancache.init_fs()
    return StackParts(PageCache(page_cache_pages, cleancache), cleancache, tmem)


def new_host(tmem_pages: int, *, abi: str = "v1") -> Any:
    """An embedded tmemcore host of ``tmem_pages`` pages, or None for "no tmem"."""
    if tmem_pages <= 0:
        return None
    return tmem_class()(memory_pages=tmem_pages, accept_v0=abi in ("v0", "auto"))


def tmem_class() -> Any:
    """``tmemcore.Tmem``, imported when first needed (the trace-only tools never load the host)."""
    from tmemcore import Tmem

    return Tmem


def enable_compression(tmem: Any, client_id: int) -> None:
    """Turn on the host's per-client compression (TMEMC_SET_COMPRESS), through the control API."""
    tmem.set_compress(client_id, True)


class FileKeys:
    """Synthetic FileKeys for trace files, made once per file number."""

    def __init__(self) -> None:
        from guestfs.filekey import FileKey

        self._make = FileKey
        self._keys: dict[int, Any] = {}

    def __call__(self, file_no: int) -> Any:
        key = self._keys.get(file_no)
        if key is None:
            key = self._keys[file_no] = self._make(oid=file_no + 1, source="synthetic", ino=file_no + 1)
        return key


class StampCheck:
    """Counts pages served with wrong bytes (each hit is compared with the key's stamp)."""

    def __init__(self) -> None:
        self.wrong_reads = 0
        self.wrong_bytes = 0

    def verify(self, data: bytes, key: int) -> None:
        if data != stamp_page(key):
            self.wrong_reads += 1
            self.wrong_bytes += wrong_byte_count(data, key)


def replay_stack(
    keys: np.ndarray,
    page_cache_pages: int,
    tmem_pages: int,
    *,
    abi: str = "v1",
    fold: str = "xxh64",
    compress: bool = False,
    trace: str = "trace",
    progress: Progress = None,
    check_every: int = 0,
) -> SimResult:
    """Replay through the real PageCache/CleanCache/InProcessTransport/Tmem; page bytes checked.

    ``check_every`` > 0 calls the stack's ``check()`` invariants every that many requests (slow).
    """
    if page_cache_pages < 1 or tmem_pages < 0:
        raise ValueError("page cache needs at least 1 page and tmem at least 0 pages")
    tmem = new_host(tmem_pages, abi=abi)
    guest = build_guest(page_cache_pages, tmem, abi=abi, fold=fold, tracked_pages=max(1 << 20, 2 * keys.size))
    if compress and tmem is not None:
        enable_compression(tmem, 1)
    started = time.perf_counter()
    counts = replay_into(guest, keys, progress, check_every)
    seconds = time.perf_counter() - started
    result = SimResult(
        trace,
        "stack",
        page_cache_pages,
        tmem_pages,
        len(keys),
        counts["page-cache"],
        counts["tmem"],
        counts["backing"],
        wrong_reads=counts["wrong_reads"],
        wrong_bytes=counts["wrong_bytes"],
        seconds=seconds,
        extra={"cleancache": guest.cleancache.stats(), "tmem": tmem.stats() if tmem is not None else {}},
    )
    guest.cleancache.check()
    guest.cache.check()
    if tmem is not None:
        tmem.check()
    result.check()
    return result


def replay_into(guest: StackParts, keys: np.ndarray | list[int], progress: Progress, check_every: int) -> dict[str, int]:
    """The replay loop. Hot path: file keys, page indexes and stamp units are computed with numpy
    up front, so each request costs one stamp, one ``get_or_load`` and one comparison."""
    unsigned = np.asarray(keys, dtype=np.int64).view(np.uint64)
    # File numbers -> FileKeys with C-level dict work (np.unique's sort was ~4 % of a replay).
    file_numbers = (unsigned >> np.uint64(INDEX_BITS)).tolist()
    key_of_file = dict.fromkeys(file_numbers)
    make_key = FileKeys()
    for file_no in key_of_file:
        key_of_file[file_no] = make_key(file_no)
    request_keys = list(map(key_of_file.__getitem__, file_numbers))
    indexes = (unsigned & np.uint64(INDEX_MASK)).tolist()
    units = stamp_units(unsigned)  # one numpy pass instead of a struct pack per request
    cache, cleancache = guest.cache, guest.cleancache
    get_or_load = cache.get_or_load
    checker = StampCheck()
    # Where each request was served, from the stack's own counters (cheaper than tallying each
    # ``get_or_load`` answer here): first-chance hits, and of the misses the tmem hits.
    hits, misses, tmem_hits = cache.hits, cache.misses, cleancache.succ_gets
    repeat = PAGE_BYTES // _STAMP.size
    total = len(units)
    for start in range(0, total, CHUNK):
        stop = min(start + CHUNK, total)
        for file_key, index, unit in zip(request_keys[start:stop], indexes[start:stop], units[start:stop]):
            expected = unit * repeat  # == stamp_page(key)
            # The loader returns ``expected`` itself (bytes.__bytes__ of an exact bytes object is
            # the object): a C-level bound method, cheaper to make and call than a lambda.
            data = get_or_load(file_key, index, expected.__bytes__)[0]
            if data is not expected and data != expected:
                checker.verify(data, stamp_key(unit))
        if progress is not None:
            progress(stop - start)
        if check_every and (start // CHUNK) % max(1, check_every // CHUNK) == 0:
            guest.cache.check()
            guest.cleancache.check()
    tmem_hits = cleancache.succ_gets - tmem_hits
    counts = {"page-cache": cache.hits - hits, "tmem": tmem_hits, "backing": cache.misses - misses - tmem_hits}
    counts["wrong_reads"] = checker.wrong_reads
    counts["wrong_bytes"] = checker.wrong_bytes
    return counts


# --- several configurations ---------------------------------------------------------------------


def simulate_configs(
    trace: Any,
    page_cache_pages: int,
    tmem_sizes: list[int],
    *,
    engine: str = "stack",
    opt: bool = False,
    abi: str = "v1",
    fold: str = "xxh64",
    compress: bool = False,
    progress: Progress = None,
) -> list[SimResult]:
    """One ``SimResult`` per tmem size; with ``opt`` each carries Belady at page cache + tmem."""
    from .mrc import LruCurve
    from .opt import belady_hits, next_use

    started = time.perf_counter()
    curve = LruCurve.of(trace.keys) if engine == "fast" else None
    curve_seconds = time.perf_counter() - started  # one pass serves every configuration
    future = next_use(trace.keys) if opt else None
    results = []
    for tmem_pages in tmem_sizes:
        if engine == "fast":
            result = fast_counts(curve, page_cache_pages, tmem_pages, trace=trace.name)
            result.seconds = curve_seconds
            if progress is not None:
                progress(trace.requests)
        elif engine == "model":
            result = replay_model(trace.keys, page_cache_pages, tmem_pages, trace=trace.name, progress=progress)
        else:
            result = replay_stack(
                trace.keys, page_cache_pages, tmem_pages, abi=abi, fold=fold, compress=compress,
                trace=trace.name, progress=progress,
            )
        if opt:
            result.belady_pages = page_cache_pages + tmem_pages
            result.belady_hits = belady_hits(trace.keys, result.belady_pages, next_positions=future)
        results.append(result)
    return results
