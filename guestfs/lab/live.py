"""Workloads through a REAL guestfs FUSE mount (``guestfs.mount.start_mount``), with stats.

The built-in workload is a seeded Zipf(alpha) sequence of 4 KiB preads over all pages of all
files in the source tree (popularity ranks shuffled by the seed), run against the mountpoint;
every read is compared with the backing file's bytes (``wrong_reads`` must be 0). With
fio (the default of ``guestfs lab live`` when fio is installed; ``--workload builtin`` forces the
checked reader), fio's own ``random_distribution=zipf`` drives one file made by concatenating the
tree's files (fio's bytes are not checked).

Counters come from the daemon's ``Stack.stats()`` as ``guestfs stats --json`` prints them
(``guestfs.mount.read_stats``); ``backing_bytes_read`` is what the mount read from the backing
store. A tmem size of 0 mounts with a one-page host (the mount refuses a zero budget), which is
the "no tmem" baseline in practice.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import plots, report

PAGE_BYTES = 4096
TEXT_SOURCES = (Path("/usr/share/common-licenses"), Path("/usr/share/doc"), Path("/usr/share/perl5"),
                Path("/usr/share/python3"), Path("/usr/lib/python3"))


@dataclass(frozen=True)
class ReadPlan:
    """A seeded list of (relative path, page index) reads."""

    files: list[str]
    sizes: list[int]
    reads: list[tuple[int, int]]  # (file number, page index)

    @property
    def distinct_pages(self) -> int:
        return len(set(self.reads))


def make_text_tree(dest: Path, files: int, *, seed: int = 1, min_bytes: int = 3 * PAGE_BYTES,
                   max_total: int = 24 << 20) -> Path:
    """Copy up to ``files`` real text files (>= min_bytes) from /usr/share into ``dest``.

    Real text compresses like real file content does; when the machine has too few such files
    the rest are seeded pseudo-text (words from a fixed list).
    """
    dest.mkdir(parents=True, exist_ok=True)
    found: list[Path] = []
    for root in TEXT_SOURCES:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            if len(found) >= files * 4:
                break
            if path.is_file() and not path.is_symlink() and min_bytes <= path.stat().st_size <= 1 << 20:
                found.append(path)
    rng = np.random.default_rng(seed)
    chosen = [found[i] for i in sorted(rng.permutation(len(found))[:files])] if found else []
    total = 0
    for number, path in enumerate(chosen):
        if total >= max_total:
            break
        target = dest / f"f{number:05d}-{path.name}"
        shutil.copyfile(path, target)
        total += target.stat().st_size
    words = ["tmem", "page", "cache", "guest", "host", "pool", "object", "index", "clean", "evict", "the", "of"]
    for number in range(len(chosen), files):
        text = " ".join(words[i] for i in rng.integers(0, len(words), 4 * PAGE_BYTES // 5))
        (dest / f"g{number:05d}.txt").write_text(text)
    return dest


def plan_reads(source: Path, reads: int, *, alpha: float = 0.9, seed: int = 1) -> ReadPlan:
    """Zipf(alpha) over every page of every regular file under ``source`` (seeded)."""
    files = sorted(str(p.relative_to(source)) for p in source.rglob("*") if p.is_file() and not p.is_symlink())
    sizes = [(source / f).stat().st_size for f in files]
    pages = [(f, i) for f, size in enumerate(sizes) for i in range(max(1, -(-size // PAGE_BYTES)))]
    if not pages:
        raise ValueError(f"{source}: no files to read")
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, len(pages) + 1, dtype=np.float64) ** alpha
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    ranks = np.minimum(np.searchsorted(cdf, rng.random(reads)), len(pages) - 1)
    order = rng.permutation(len(pages))
    return ReadPlan(files, sizes, [pages[order[r]] for r in ranks.tolist()])


def run_reads(mountpoint: Path, source: Path, plan: ReadPlan) -> dict[str, Any]:
    """Execute the plan through the mount; compare every read with the backing file."""
    fds: dict[int, int] = {}
    wrong = 0
    started = time.perf_counter()
    try:
        for file_no, index in plan.reads:
            fd = fds.get(file_no)
            if fd is None:
                fd = fds[file_no] = os.open(mountpoint / plan.files[file_no], os.O_RDONLY)
            data = os.pread(fd, PAGE_BYTES, index * PAGE_BYTES)
            with open(source / plan.files[file_no], "rb") as backing:
                backing.seek(index * PAGE_BYTES)
                if backing.read(PAGE_BYTES) != data:
                    wrong += 1
    finally:
        for fd in fds.values():
            os.close(fd)
    seconds = time.perf_counter() - started
    return {"reads": len(plan.reads), "wrong_reads": wrong, "seconds": seconds,
            "reads_per_second": len(plan.reads) / seconds if seconds else 0.0}


FIO_FILE = "fio-zipf.dat"


def add_fio_file(source: Path, max_bytes: int = 16 << 20) -> str:
    """Concatenate the tree's files into one file for fio (fio's zipf works over one file)."""
    target = source / FIO_FILE
    if not target.exists():
        with open(target, "wb") as out:
            for path in sorted(source.rglob("*")):
                if out.tell() >= max_bytes:
                    break
                if path.is_file() and not path.is_symlink() and path != target:
                    out.write(path.read_bytes()[: max_bytes - out.tell()])
    return FIO_FILE


def run_fio(mountpoint: Path, big_file: str, reads: int, seed: int) -> dict[str, Any]:
    """fio randread with a zipf distribution over one file of the mount (bytes not checked)."""
    size = (mountpoint / big_file).stat().st_size
    command = ["fio", "--name=zipf", f"--filename={mountpoint / big_file}", "--rw=randread", "--bs=4k",
               "--random_distribution=zipf:0.9", f"--number_ios={reads}", f"--io_size={reads * PAGE_BYTES * 4}",
               f"--size={size // PAGE_BYTES * PAGE_BYTES}", f"--randseed={seed}", "--ioengine=psync",
               "--output-format=terse"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"fio failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return {"reads": reads, "wrong_reads": 0, "seconds": time.perf_counter() - started, "engine": "fio"}


def mount_args(page_cache_pages: int, tmem_pages: int, *, abi: str = "v1", fold: str = "xxh64",
               compress: bool = False) -> list[str]:
    args = ["--page-cache", f"{page_cache_pages * 4}K", "--tmem", f"{max(tmem_pages, 1) * 4}K",
            "--abi", abi, "--v0-fold", fold]
    return args + (["--compress"] if compress else [])


def live_run(
    source: Path,
    plan: ReadPlan,
    *,
    page_cache_pages: int = 256,
    tmem_pages: int = 4096,
    abi: str = "v1",
    fold: str = "xxh64",
    compress: bool = False,
    use_fio: bool = False,
    seed: int = 1,
    timeout: float = 20.0,
) -> dict[str, Any]:
    """Mount ``source``, run the workload, return the workload result plus the daemon's stats.

    With ``use_fio`` the tree must already hold ``FIO_FILE`` (``add_fio_file``)."""
    from guestfs.mount import start_mount

    with tempfile.TemporaryDirectory(prefix="guestfs-lab-mnt-") as mountpoint:
        handle = start_mount(str(source), mountpoint, mount_args(page_cache_pages, tmem_pages, abi=abi, fold=fold,
                                                                 compress=compress), timeout=timeout)
        try:
            if use_fio:
                workload = run_fio(Path(mountpoint), add_fio_file(source), len(plan.reads), seed)
            else:
                workload = run_reads(Path(mountpoint), source, plan)
            stats = handle.stats()
            if use_fio:  # what fio issued, as the daemon counted it
                workload["reads"] = int(stats.get("reads", workload["reads"]))
        finally:
            handle.unmount(timeout=timeout)
    return {"page_cache_pages": page_cache_pages, "tmem_pages": tmem_pages, "abi": abi, "fold": fold,
            "compress": compress, **workload, "stats": stats}


def flatten(run: dict[str, Any]) -> dict[str, Any]:
    """One CSV row from a live run: the workload and the most telling stats counters."""
    stats = run.get("stats", {})
    row = {k: v for k, v in run.items() if k != "stats"}
    for name in ("mode", "page_cache_hits", "page_cache_misses", "succ_gets", "failed_gets", "puts", "invalidates",
                 "fold_collisions", "backing_reads", "backing_bytes_read", "readahead_loaded"):
        if name in stats:
            row[name] = stats[name]
    host = stats.get("host") or {}
    glob = host.get("global", {})
    for name in ("used_bytes", "evicted_pgs", "global_eph_count"):
        if name in glob:
            row[f"host_{name}"] = glob[name]
    for client in host.get("clients", []):
        for name in ("compressed_pages", "compressed_sum_size", "compress_poor"):
            row[f"host_{name}"] = row.get(f"host_{name}", 0) + int(client.get(name, 0))
    reads = row.get("reads") or 0
    if reads and "succ_gets" in row:
        row["tmem_hit_ratio"] = row["succ_gets"] / reads
        row["hit_ratio"] = (row.get("page_cache_hits", 0) + row["succ_gets"]) / reads
    return row


def run_small_live_workload(source: Path | None = None, *, reads: int = 2000, page_cache_pages: int = 64,
                            tmem_pages: int = 2048, seed: int = 1) -> dict[str, Any]:
    """For the demo: a small seeded zipf workload through a live mount; returns the run + stats."""
    with tempfile.TemporaryDirectory(prefix="guestfs-lab-src-") as scratch:
        tree = source or make_text_tree(Path(scratch) / "src", 60, seed=seed)
        plan = plan_reads(tree, reads, seed=seed)
        return live_run(tree, plan, page_cache_pages=page_cache_pages, tmem_pages=tmem_pages, seed=seed)


def run_live_experiment(args: argparse.Namespace, out: Path) -> str:
    """``guestfs lab live``: a tmem sweep (and compression) through real mounts."""
    sizes = args.tmem_sizes if args.tmem_sizes != "auto" else [0, 1024, 4096, 16384]
    with tempfile.TemporaryDirectory(prefix="guestfs-lab-src-") as scratch:
        source = args.source or make_text_tree(Path(scratch) / "src", args.files, seed=args.seed)
        use_fio = args.workload == "fio" or (args.workload == "auto" and shutil.which("fio") is not None)
        if use_fio:
            add_fio_file(source)  # before planning, so both workloads see the same tree
        plan = plan_reads(source, args.reads, seed=args.seed)
        runs = []
        for compress in ([False, True] if args.compress else [False]):
            for tmem_pages in sizes:
                runs.append(live_run(source, plan, page_cache_pages=args.page_cache, tmem_pages=tmem_pages,
                                     compress=compress, use_fio=use_fio, seed=args.seed))
    rows = [flatten(run) for run in runs]
    report.write_csv(out / "live.csv", rows)
    report.write_json(out / "live.json", {"meta": report.run_metadata(), "distinct_pages": plan.distinct_pages,
                                          "runs": runs})
    for compress in sorted({r["compress"] for r in rows}):
        subset = [r for r in rows if r["compress"] == compress]
        plots.plot_curves(out / f"live{'-compress' if compress else ''}.png", "live mount: tmem hit ratio",
                          "tmem size (pages)", {"tmem hits / reads": ([r["tmem_pages"] for r in subset],
                                                                      [r.get("tmem_hit_ratio", 0.0) for r in subset])})
    columns = ["tmem_pages", "compress", "reads", "wrong_reads", "page_cache_hits", "succ_gets", "hit_ratio",
               "backing_bytes_read", "host_used_bytes", "host_compressed_pages"]
    workload = (f"fio randread zipf:0.9 over {FIO_FILE} (bytes not checked)" if use_fio else
                f"built-in zipf(0.9) reader over {len(plan.files)} files ({plan.distinct_pages:,} distinct pages), "
                "every read checked against the backing file")
    body = (f"{len(plan.reads):,} 4 KiB reads per run: {workload}; page cache {args.page_cache} pages.\n\n"
            + report.markdown_table(rows, columns))
    report.write_summary(out / "summary.md", "Live mount: tmem sweep", [("Runs", body)])
    return body
