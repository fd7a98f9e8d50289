"""`guestfs demo` (what `make demo` runs): the main job end to end on this machine.

1. builds a sample tree of real file content (and, where loop devices and btrfs-progs exist,
   a btrfs image with two subvolumes whose files share inode numbers);
2. mounts the sample tree with guestfs on an embedded tmem host, once per tmem size, runs the
   same seeded read workload through each mount (every read compared with the backing file)
   and prints first-chance and tmem hit rates and the bytes read from the backing store;
3. prints the v0/v1 keying table and, on btrfs, mounts the subvolumes once per ABI to show
   what the v0 collision guard prevents;
4. sweeps tmem sizes on a real trace through the real cache stack, with LRU and Belady bounds;
5. writes CSV, JSON, a Markdown summary and (with matplotlib) PNG plots; every mount is
   unmounted, also on failure.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from .cli import UsageError, UsageParser
from .config import parse_size, size_to_pages
from .lab.cli import (
    HelpFormatter,
    describe_error,
    input_file_problem,
    non_negative_int,
    out_dir_problem,
    positive_int,
)

LIVE_COLUMNS = ["tmem", "reads", "wrong_reads", "first_chance_hit", "tmem_hit", "total_hit", "backing_MiB"]
KEYING_LIVE_COLUMNS = ["abi", "fold", "mode", "reads", "wrong_reads", "succ_gets", "fold_collisions", "record_bytes"]
SWEEP_COLUMNS = ["tmem_pages", "baseline_hit_ratio", "exclusive_hit_ratio", "shared_hit_ratio",
                 "lru_total_hit_ratio", "belady_hit_ratio", "victim_identity_holds", "wrong_bytes"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``guestfs demo``; returns the exit status (2: bad usage, one line on stderr)."""
    try:
        args = _parser().parse_args(argv)
        problem = (input_file_problem("--trace", Path(args.trace)) if args.trace else "") \
            or out_dir_problem("--out", Path(args.out))
        if problem:  # a missing input is bad usage (exit 2), as in guestfs lab
            raise UsageError(f"guestfs demo: error: {problem}")
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        trace = _demo_trace(args.trace)  # before any mount: a trace that cannot be parsed fails early (exit 1)
        out = Path(args.out).resolve()
        out.mkdir(parents=True, exist_ok=True)
        return _run(args, out, args.page_cache, args.tmem_sizes, trace)
    except (OSError, RuntimeError, ValueError) as exc:  # a mount that fails, a full disk: one line, no traceback
        print(f"guestfs demo: error: {describe_error(exc)}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, out: Path, page_cache_pages: int, tmem_sizes: list[int], trace: Any) -> int:
    started = time.monotonic()
    results: dict[str, Any] = {}
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="guestfs-demo-")))
        tree = _sample_tree(work / "sample", args.files, args.seed)
        results["live"] = run_live_sweep(tree, page_cache_pages, tmem_sizes, args.reads, args.seed)
        btrfs_tree = stack.enter_context(_optional_btrfs(work))
        results["keying"] = run_keying(tree, btrfs_tree, args.seed)
        results["sweep"] = run_trace_sweep(trace)
    _write_results(out, results)
    _section(f"done in {time.monotonic() - started:.0f} s; results in {out}")
    return 0


def _pages(text: str) -> int:
    """An argparse type: a size in bytes (K/M/G suffixes) as 4 KiB pages, at least one page."""
    try:
        pages = size_to_pages(parse_size(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if pages < 1:
        raise argparse.ArgumentTypeError(f"size {text!r} must be at least one 4 KiB page")
    return pages


def _page_list(text: str) -> list[int]:
    """An argparse type: comma-separated sizes, each at least one page."""
    return [_pages(part) for part in text.split(",")]


def _parser() -> argparse.ArgumentParser:
    p = UsageParser(
        prog="guestfs demo",
        description="Mount a cached filesystem on an embedded tmem host, run a read workload, "
        "show hit rates and the v0/v1 keying comparison, sweep tmem sizes on a trace, unmount.",
        formatter_class=HelpFormatter,  # one "(default: ...)" per option, as in guestfs lab
    )
    p.add_argument("--out", default="results/demo", help="directory for CSV/JSON/PNG/Markdown results")
    p.add_argument("--files", type=positive_int, default=120, help="files in the sample tree (real text from /usr/share)")
    p.add_argument("--reads", type=positive_int, default=4000, help="4 KiB reads per live run")
    p.add_argument("--page-cache", type=_pages, default="256K", help="first-chance page cache of each mount")
    p.add_argument("--tmem-sizes", type=_page_list, default="4K,1M,4M,16M", help="embedded tmem budgets to sweep (4K = one page: no tmem)")
    p.add_argument("--trace", default=None,
                   help="trace for the size sweep (default: the shared LIRS multi2 trace, else a synthetic zipf)")
    p.add_argument("--seed", type=non_negative_int, default=1, help="workload seed")
    return p


def _section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    from .lab.report import markdown_table

    return markdown_table(rows, columns)


# --- 1. sample tree ------------------------------------------------------------------------


def _sample_tree(dest: Path, files: int, seed: int) -> Path:
    from .lab.live import make_text_tree

    tree = make_text_tree(dest, files, seed=seed)
    paths = [p for p in tree.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in paths)
    _section(f"sample tree: {len(paths)} files, {size / (1 << 20):.1f} MiB of real text ({tree})")
    return tree


# --- 2. live mounts ------------------------------------------------------------------------


def run_live_sweep(tree: Path, page_cache_pages: int, tmem_sizes: list[int], reads: int, seed: int) -> list[dict]:
    from .lab.live import live_run, plan_reads

    plan = plan_reads(tree, reads, seed=seed)
    _section(f"live mounts: {reads} seeded zipf 4 KiB reads ({plan.distinct_pages} distinct pages), "
             f"guestfs's first-chance cache {page_cache_pages} pages (--first-chance daemon: every read counted), "
             "embedded tmem host")
    rows = []
    for tmem_pages in tmem_sizes:
        run = live_run(tree, plan, page_cache_pages=page_cache_pages, tmem_pages=tmem_pages, seed=seed)
        rows.append(_live_row(run))
    print(_table(rows, LIVE_COLUMNS))
    print("a 4 KiB host holds one page: the no-tmem baseline. first_chance_hit stays put while tmem_hit grows with\n"
          "the budget, and every read was compared with the backing file (wrong_reads).")
    return rows


def _live_row(run: dict[str, Any]) -> dict[str, Any]:
    stats, reads = run["stats"], run["reads"]
    first, tmem = stats.get("page_cache_hits", 0), stats.get("succ_gets", 0)
    return {
        "tmem": f"{run['tmem_pages'] * 4} KiB",
        "tmem_pages": run["tmem_pages"],
        "reads": reads,
        "wrong_reads": run["wrong_reads"],
        "first_chance_hit": first / reads,
        "tmem_hit": tmem / reads,
        "total_hit": (first + tmem) / reads,
        "backing_MiB": round(stats.get("backing_bytes_read", 0) / (1 << 20), 2),
        "puts": stats.get("puts", 0),
        "failed_gets": stats.get("failed_gets", 0),
        "mode": stats.get("mode", ""),
    }


# --- 3. keying ------------------------------------------------------------------------------


@contextmanager
def _optional_btrfs(work: Path) -> Iterator[Path | None]:
    from .lab.btrfs import btrfs_subvolume_image, btrfs_unavailable_reason

    reason = btrfs_unavailable_reason()
    if reason:
        print(f"(btrfs part skipped: {reason})")
        yield None
        return
    with btrfs_subvolume_image(work / "btrfs") as image:
        yield Path(image.mountpoint)


def run_keying(tree: Path, btrfs_tree: Path | None, seed: int) -> dict[str, Any]:
    from .lab.keying import format_table, keying_table, live_keying

    _section("v0/v1 keying: how files become tmem object ids, and where 64-bit folds collide (v1 must be 0)")
    static = keying_table([tree] + ([btrfs_tree] if btrfs_tree else []))
    print(format_table(static))
    result: dict[str, Any] = {"trees": static, "live": []}
    if btrfs_tree is None:
        return result
    _section("the same reads through live mounts of the btrfs subvolumes, per ABI "
             "(--first-chance daemon with a tiny cache, so reads go through tmem)")
    result["live"] = live_keying(btrfs_tree, reads=2000, seed=seed)
    print(_table(result["live"], KEYING_LIVE_COLUMNS))
    print("v0+ino folds both subvolumes' files onto the same 64-bit oids; the collision guard bypasses tmem for\n"
          "the second owner (fold_collisions), so wrong_reads stays 0 at the cost of tmem hits.")
    return result


# --- 4. trace sweep --------------------------------------------------------------------------


def _demo_trace(path: str | None) -> Any:
    from .lab.traces import load_trace, shared_traces_dir, synthetic_zipf

    if path:
        return load_trace(Path(path))
    shared = shared_traces_dir()
    if shared is not None and (shared / "lirs" / "multi2.trace.gz").is_file():
        return load_trace(shared / "lirs" / "multi2.trace.gz")
    return synthetic_zipf(30_000, 6_000, seed=1)


def run_trace_sweep(trace: Any) -> dict[str, Any]:
    from .lab.hitrate import tmem_sweep

    page_cache_pages = 500
    sizes = [0, 250, 500, 1000, 2000, 4000]
    _section(f"trace {trace.name} ({trace.requests} requests): first-chance {page_cache_pages} pages + tmem M pages, "
             "replayed through the real stack (exclusive private pool, and shared pool), against LRU(N+M) and Belady")
    rows = tmem_sweep(trace, page_cache_pages, sizes, quiet=True)
    print(_table(rows, SWEEP_COLUMNS))
    return {"trace": trace.name, "page_cache_pages": page_cache_pages, "rows": rows}


# --- 5. results -------------------------------------------------------------------------------


def _write_results(out: Path, results: dict[str, Any]) -> None:
    from .lab import plots, report

    report.write_json(out / "demo.json", {"meta": report.run_metadata(["guestfs", "demo"]), **results})
    report.write_csv(out / "live.csv", results["live"])
    report.write_csv(out / "keying_trees.csv", results["keying"]["trees"])
    if results["keying"]["live"]:
        report.write_csv(out / "keying-live.csv", results["keying"]["live"])  # the name guestfs lab keying uses
    sweep = results["sweep"]["rows"]
    report.write_csv(out / "sweep.csv", sweep)
    live = results["live"]
    made = [
        plots.plot_bars(out / "live.png", "live mounts: where reads were served", [r["tmem"] for r in live],
                        {"first-chance": [100 * r["first_chance_hit"] for r in live],
                         "tmem": [100 * r["tmem_hit"] for r in live]}, ylabel="reads (%)"),
        plots.plot_curves(out / "sweep.png", f"{results['sweep']['trace']}: hit ratio vs tmem size", "tmem pages",
                          {name: ([r["tmem_pages"] for r in sweep], [r[key] for r in sweep])
                           for name, key in (("page cache only", "baseline_hit_ratio"),
                                             ("+ tmem, exclusive", "exclusive_hit_ratio"),
                                             ("+ tmem, shared", "shared_hit_ratio"),
                                             ("Belady(N+M)", "belady_hit_ratio"))}),
    ]
    sections = [("Live mounts", _table(live, LIVE_COLUMNS)),
                ("Keying", "```\n" + _keying_text(results["keying"]) + "\n```"),
                ("Trace sweep: " + results["sweep"]["trace"], _table(sweep, SWEEP_COLUMNS))]
    report.write_summary(out / "summary.md", "guestfs demo", sections)
    pngs = [p.name for p in made if p is not None]
    print("plots: " + (", ".join(pngs) if pngs else "none (install the 'plot' extra for PNGs)"))


def _keying_text(keying: dict[str, Any]) -> str:
    from .lab.keying import format_table

    text = format_table(keying["trees"])
    if keying["live"]:
        text += "\n\n" + _table(keying["live"], KEYING_LIVE_COLUMNS)
    return text


if __name__ == "__main__":
    raise SystemExit(main())
