"""Hit-rate experiments: LRU/Belady curves, tmem-size sweeps, exclusive vs shared, weighted clients.

- ``mrc_experiment``  the exact LRU curve of a trace (plus Belady) at chosen sizes.
- ``tmem_sweep``      a fixed first-chance cache N and tmem sizes M: no-tmem baseline LRU(N),
                      exclusive second chance (private ephemeral pool: a get removes the page) replayed
                      through the real stack and checked against the fast path LRU(N+M), non-exclusive
                      second chance (shared ephemeral pool: gets keep the copy) through the real host,
                      and the Belady bound at N+M.
- ``multi_client``    K guests (each its own page cache and cleancache) on ONE host budget with weights;
                      per-client hit rates and tmem occupancy.

Everything is seeded and deterministic; ``run_hitrate`` writes CSV + JSON + Markdown (+ PNG).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import plots, report
from .mrc import LruCurve
from .opt import belady_hits, next_use
from .simulate import (
    CHUNK,
    INDEX_BITS,
    INDEX_MASK,
    U64,
    FileKeys,
    SimResult,
    StampCheck,
    build_guest,
    replay_model,
    replay_stack,
    stamp_page,
    tmem_class,
)
from .traces import Trace, synthetic_zipf


def mrc_experiment(
    trace: Trace, sizes: list[int] | str, *, opt: bool = False, out: Path | None = None, quiet: bool = False
) -> list[dict[str, Any]]:
    """Rows (size, LRU hits/ratio[, Belady hits/ratio]); with ``out`` also CSV/JSON/PNG/summary."""
    curve = LruCurve.of(trace.keys)
    chosen = curve.default_sizes() if sizes == "auto" else list(sizes)
    future = next_use(trace.keys) if opt else None
    rows = []
    with report.Progress(trace.requests * len(chosen) if opt else 0, f"belady {trace.name}", quiet=quiet) as bar:
        for size in chosen:
            row: dict[str, Any] = {"trace": trace.name, "size": size, "lru_hits": curve.hits(size),
                                   "lru_hit_ratio": curve.hit_ratio(size)}
            if opt:
                hits = belady_hits(trace.keys, size, next_positions=future, progress=bar.callback)
                row.update(belady_hits=hits, belady_hit_ratio=hits / trace.requests)
            rows.append(row)
    if out is not None:
        write_mrc(out, trace, curve, rows)
    return rows


def write_mrc(out: Path, trace: Trace, curve: LruCurve, rows: list[dict[str, Any]]) -> None:
    report.write_csv(out / "mrc.csv", rows)
    report.write_json(out / "mrc.json", {"meta": report.run_metadata(), "trace": trace.name,
                                         "requests": trace.requests, "unique": curve.unique, "rows": rows})
    series = {"LRU": ([r["size"] for r in rows], [r["lru_hit_ratio"] for r in rows])}
    if rows and "belady_hit_ratio" in rows[0]:
        series["Belady"] = ([r["size"] for r in rows], [r["belady_hit_ratio"] for r in rows])
    plots.plot_curves(out / "mrc.png", f"{trace.name}: hit ratio vs cache size", "cache size (pages)", series)
    columns = ["size", "lru_hit_ratio"] + (["belady_hit_ratio"] if "belady_hit_ratio" in rows[0] else [])
    report.write_summary(out / "summary.md", f"LRU curve of {trace.name}", [
        ("Trace", f"{trace.requests:,} page requests, {curve.unique:,} unique pages ({trace.format})."),
        ("Hit ratio by cache size", report.markdown_table(rows, columns)),
    ])


# --- the tmem sweep ------------------------------------------------------------------------------


def auto_tmem_sizes(curve: LruCurve, page_cache_pages: int) -> list[int]:
    """0, then multiples of the page cache up to the working set (so the curve reaches its knee)."""
    top = max(curve.working_set_size(), page_cache_pages)
    sizes = {0}
    size = max(page_cache_pages // 4, 1)
    while size < top:
        sizes.add(size)
        size *= 2
    sizes.add(top)
    return sorted(sizes)


class SharedPoolFrontend:
    """A cleancache stand-in over a SHARED ephemeral tmemcore pool: gets keep the host's copy.

    The real frontend only creates private pools (as Linux did for cleancache); this adapter
    lets the real ``PageCache`` and the real host run the non-exclusive variant. A put of a page
    the host already holds replaces it (duplicate put).
    """

    def __init__(self, tmem: Any, client_id: int = 1) -> None:
        self.pool = tmem.client(client_id).new_pool(shared=True, uuid=(0x6775657374, 0x6673))
        self.succ_gets = self.failed_gets = self.puts = 0

    def put_page(self, key: Any, index: int, data: bytes) -> None:
        self.puts += 1
        self.pool.put(key.oid, index, data)

    def get_page(self, key: Any, index: int) -> bytes | None:
        data = self.pool.get(key.oid, index)
        if data is None:
            self.failed_gets += 1
        else:
            self.succ_gets += 1
        return data

    def holds(self, key: Any, index: int) -> bool:
        return False  # non-exclusive: a host copy beside the first-chance copy is expected

    def invalidate_page(self, key: Any, index: int) -> None:
        self.pool.flush_page(key.oid, index)

    def check(self) -> None:
        assert self.succ_gets >= 0 and self.failed_gets >= 0 and self.puts >= 0


def replay_shared(keys: np.ndarray, page_cache_pages: int, tmem_pages: int, *, trace: str = "trace") -> SimResult:
    """The non-exclusive variant through the real PageCache and a real shared tmem pool."""
    import time

    from guestfs.pagecache import PageCache

    tmem = tmem_class()(memory_pages=tmem_pages)
    frontend = SharedPoolFrontend(tmem)
    cache = PageCache(page_cache_pages, frontend)  # type: ignore[arg-type]
    counts = {"page-cache": 0, "tmem": 0, "backing": 0}
    checker = StampCheck()
    file_key = FileKeys()
    started = time.perf_counter()
    for key in keys.tolist():
        key &= U64
        expected = stamp_page(key)
        data, where = cache.get_or_load(file_key(key >> INDEX_BITS), key & INDEX_MASK, lambda: expected)
        counts[where] += 1
        if data != expected:
            checker.verify(data, key)
    tmem.check()
    result = SimResult(trace, "stack-shared", page_cache_pages, tmem_pages, int(keys.size), counts["page-cache"],
                       counts["tmem"], counts["backing"], checker.wrong_reads, checker.wrong_bytes,
                       time.perf_counter() - started)
    result.check()
    return result


def tmem_sweep(
    trace: Trace,
    page_cache_pages: int,
    tmem_sizes: list[int] | str,
    *,
    engine: str = "stack",
    opt: bool = True,
    shared: bool = True,
    quiet: bool = False,
) -> list[dict[str, Any]]:
    """One row per tmem size (see module docstring)."""
    curve = LruCurve.of(trace.keys)
    sizes = auto_tmem_sizes(curve, page_cache_pages) if tmem_sizes == "auto" else list(tmem_sizes)
    future = next_use(trace.keys) if opt else None
    baseline = curve.hits(page_cache_pages)
    rows = []
    work = trace.requests * len(sizes) * (1 + int(shared))
    with report.Progress(work, f"sweep {trace.name}", quiet=quiet) as bar:
        for tmem_pages in sizes:
            if engine == "stack":
                exclusive = replay_stack(trace.keys, page_cache_pages, tmem_pages, trace=trace.name,
                                         progress=bar.callback)
            else:
                exclusive = replay_model(trace.keys, page_cache_pages, tmem_pages, trace=trace.name,
                                         progress=bar.callback)
            lru_total = curve.hits(page_cache_pages + tmem_pages)
            row: dict[str, Any] = {
                "trace": trace.name,
                "page_cache_pages": page_cache_pages,
                "tmem_pages": tmem_pages,
                "requests": trace.requests,
                "baseline_hit_ratio": baseline / trace.requests,
                "exclusive_hit_ratio": exclusive.hit_ratio,
                "exclusive_page_cache_hits": exclusive.page_cache_hits,
                "exclusive_tmem_hits": exclusive.tmem_hits,
                "exclusive_engine": exclusive.engine,
                "lru_total_hit_ratio": lru_total / trace.requests,
                "victim_identity_holds": exclusive.hits == lru_total and exclusive.page_cache_hits == baseline,
                "wrong_bytes": exclusive.wrong_bytes,
                "exclusive_req_per_s": exclusive.requests_per_second,
            }
            if shared:
                if tmem_pages > 0:
                    nonexclusive = replay_shared(trace.keys, page_cache_pages, tmem_pages, trace=trace.name)
                else:
                    nonexclusive = exclusive
                if bar.callback is not None:
                    bar(trace.requests)
                row.update(shared_hit_ratio=nonexclusive.hit_ratio, shared_tmem_hits=nonexclusive.tmem_hits,
                           wrong_bytes=row["wrong_bytes"] + nonexclusive.wrong_bytes)
            if opt:
                hits = belady_hits(trace.keys, page_cache_pages + tmem_pages, next_positions=future)
                row["belady_hit_ratio"] = hits / trace.requests
            rows.append(row)
    return rows


# --- several clients on one host -------------------------------------------------------------------


def split_by_key(trace: Trace, clients: int) -> list[np.ndarray]:
    """K disjoint client traces: a request goes to client ``hash(key) % K`` (order preserved)."""
    owner = (trace.keys * np.int64(0x9E3779B1) >> np.int64(7)) % clients
    return [trace.keys[owner == c] for c in range(clients)]


def multi_client(
    streams: list[np.ndarray],
    page_cache_pages: int,
    tmem_pages: int,
    weights: list[int],
    *,
    names: list[str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """K guests on one Tmem of ``tmem_pages``, requests interleaved round-robin; rows per client."""
    tmem = tmem_class()(memory_pages=tmem_pages)
    guests = []
    for cid, weight in enumerate(weights, start=1):
        guests.append(build_guest(page_cache_pages, tmem, client_id=cid, tracked_pages=1 << 22))
        tmem.set_weight(cid, weight)
    counts = [{"page-cache": 0, "tmem": 0, "backing": 0} for _ in guests]
    checker = StampCheck()
    file_key = FileKeys()
    lists = [s.tolist() for s in streams]
    longest = max(len(s) for s in lists)
    for start in range(0, longest, CHUNK):
        stop = min(start + CHUNK, longest)
        for position in range(start, stop):
            for client, items in enumerate(lists):
                if position >= len(items):
                    continue
                key = items[position] & U64
                expected = stamp_page(key)
                data, where = guests[client].cache.get_or_load(file_key(key >> INDEX_BITS), key & INDEX_MASK,
                                                               lambda: expected)
                counts[client][where] += 1
                if data != expected:
                    checker.verify(data, key)
        if progress is not None:
            progress(sum(max(0, min(len(items), stop) - start) for items in lists))
    tmem.check()
    occupancy = client_occupancy(tmem, len(guests))
    rows = []
    for client, (guest, count) in enumerate(zip(guests, counts)):
        requests = len(lists[client])
        rows.append({
            "client": client + 1,
            "name": names[client] if names else f"client{client + 1}",
            "weight": weights[client],
            "host_pages": tmem_pages,
            "requests": requests,
            "page_cache_hits": count["page-cache"],
            "tmem_hits": count["tmem"],
            "misses": count["backing"],
            "hit_ratio": (count["page-cache"] + count["tmem"]) / requests if requests else 0.0,
            "tmem_hit_ratio": count["tmem"] / requests if requests else 0.0,
            "tmem_pages_held": occupancy.get(client + 1, 0),
            "puts": guest.cleancache.stats()["puts"],
            "wrong_bytes": checker.wrong_bytes,
        })
    return rows


def client_occupancy(tmem: Any, clients: int) -> dict[int, int]:
    """Ephemeral pages each client holds in the host (``eph_count`` in ``tmem.stats()``)."""
    return {int(entry["cli_id"]): int(entry["eph_count"]) for entry in tmem.stats()["clients"]}


# --- the command ------------------------------------------------------------------------------------


def _traces_from_args(args: argparse.Namespace) -> list[Trace]:
    from .traces import load_trace

    if not args.trace:
        return [synthetic_zipf(200_000, 50_000, 0.9, seed=args.seed)]
    loaded = [load_trace(p, args.format, include_writes=args.include_writes) for p in args.trace]
    return [t.head(args.limit) if args.limit is not None else t for t in loaded]


def run_hitrate(args: argparse.Namespace, out: Path) -> tuple[str, int]:
    """``guestfs lab hitrate``: writes hitrate.csv/json, clients.csv/json, PNGs, summary.md; returns
    the summary and the wrong bytes the replays served (0 unless the stack has a bug)."""
    traces = _traces_from_args(args)
    sections: list[tuple[str, str]] = []
    all_rows: list[dict[str, Any]] = []
    for trace in traces:
        rows = tmem_sweep(trace, args.page_cache, args.tmem_sizes, engine=args.engine, opt=not args.no_opt,
                          quiet=args.quiet)
        all_rows += rows
        columns = ["tmem_pages", "baseline_hit_ratio", "exclusive_hit_ratio", "lru_total_hit_ratio",
                   "shared_hit_ratio"] + (["belady_hit_ratio"] if not args.no_opt else []) + ["victim_identity_holds"]
        sections.append((f"{trace.name}: page cache {args.page_cache:,} pages + tmem",
                         f"{trace.requests:,} requests. Exclusive replayed with engine `{args.engine}`.\n\n"
                         + report.markdown_table(rows, columns)))
        xs = [r["tmem_pages"] for r in rows]
        series = {
            "no tmem (LRU N)": (xs, [r["baseline_hit_ratio"] for r in rows]),
            "exclusive (private pool)": (xs, [r["exclusive_hit_ratio"] for r in rows]),
            "non-exclusive (shared pool)": (xs, [r["shared_hit_ratio"] for r in rows]),
        }
        if not args.no_opt:
            series["Belady(N+M)"] = (xs, [r["belady_hit_ratio"] for r in rows])
        plots.plot_curves(out / f"hitrate-{trace.name}.png", f"{trace.name}: page cache {args.page_cache} + tmem",
                          "tmem size (pages)", series)
    report.write_csv(out / "hitrate.csv", all_rows)
    payload: dict[str, Any] = {"meta": report.run_metadata(), "rows": all_rows}
    if args.clients > 1 or len(traces) > 1:
        client_rows = run_clients(args, traces)
        payload["clients"] = client_rows
        report.write_csv(out / "clients.csv", client_rows)
        sections.append(("Clients sharing one host", report.markdown_table(
            client_rows, ["client", "name", "weight", "requests", "hit_ratio", "tmem_hit_ratio", "tmem_pages_held", "host_pages"])))
    report.write_json(out / "hitrate.json", payload)
    report.write_summary(out / "summary.md", "Hit rate with tmem second chance", sections)
    wrong_bytes = sum(row.get("wrong_bytes", 0) for row in all_rows + payload.get("clients", []))
    return "\n\n".join(f"## {h}\n\n{b}" for h, b in sections), wrong_bytes


def run_clients(args: argparse.Namespace, traces: list[Trace]) -> list[dict[str, Any]]:
    clients = args.clients  # checked by the CLI: 1 per trace when several are given
    weights = args.weights or [1] * clients
    if len(weights) != clients or (len(traces) > 1 and clients != len(traces)):
        raise ValueError(f"{clients} clients with {len(weights)} weights for {len(traces)} traces")
    if len(traces) > 1:
        streams, names = [t.keys for t in traces], [t.name for t in traces]
    else:
        streams = split_by_key(traces[0], clients)
        names = [f"{traces[0].name}/{c + 1}" for c in range(clients)]
    if args.tmem_sizes == "auto":  # contended: half of all clients' distinct pages
        tmem_pages = max(1, sum(int(np.unique(s).size) for s in streams) // 2)
    else:
        tmem_pages = max(max(args.tmem_sizes), 1)
    with report.Progress(sum(s.size for s in streams), f"{clients} clients", quiet=args.quiet) as bar:
        return multi_client(streams, args.page_cache, tmem_pages, weights, names=names, progress=bar.callback)

