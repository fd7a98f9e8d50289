"""Workloads through a REAL guestfs FUSE mount (``guestfs.mount.start_mount``), with stats.

The built-in workload is a seeded Zipf(alpha) sequence of 4 KiB preads over all pages of all
files in the source tree (popularity ranks shuffled by the seed), run against the mountpoint;
every read is compared with the backing file's bytes (``wrong_reads`` must be 0). With
fio (the default of ``guestfs lab live`` when fio is installed; ``--workload builtin`` forces the
checked reader), fio's own ``random_distribution=zipf`` drives one file made by concatenating the
tree's files into a private scratch tree, which is what the fio runs mount: the source tree --
possibly the user's ``--source`` -- is only ever read. fio checks no bytes, so its rows have
``wrong_reads`` None ("n/a"). When fio cannot run (not installed, less than one 4 KiB block of
data, or fio fails) the whole sweep falls back to the built-in reader and the output says why.

Counters come from the daemon's ``Stack.stats()`` as ``guestfs stats --json`` prints them
(``guestfs.mount.read_stats``); ``backing_bytes_read`` is what the mount read from the backing
store. A tmem size of 0 mounts with a one-page host (the mount refuses a zero budget), which is
the "no tmem" baseline in practice.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from array import array
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
    return {"workload": "builtin", "reads": len(plan.reads), "wrong_reads": wrong, "seconds": seconds,
            "reads_per_second": len(plan.reads) / seconds if seconds else 0.0}


SWEEP_READS = 4000  # guestfs lab live's --reads and --files when not given (the value table has its own)
SWEEP_FILES = 200
FIO_FILE = "fio-zipf.dat"
FIO_MAX_BYTES = 16 << 20


class FioError(RuntimeError):
    """fio could not run the workload (not installed, data file too small, or fio itself failed)."""


def make_fio_tree(source: Path, dest: Path, max_bytes: int = FIO_MAX_BYTES) -> Path:
    """A private scratch tree ``dest`` holding ``FIO_FILE``: the files of ``source`` concatenated.

    fio's zipf works over one file; building it in a scratch tree (which is what gets mounted
    for the fio runs) means ``source`` -- possibly the user's own tree -- is only ever read.
    """
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / FIO_FILE, "wb") as out:
        for path in sorted(source.rglob("*")):
            if out.tell() >= max_bytes:
                break
            if path.is_file() and not path.is_symlink():
                with open(path, "rb") as part:
                    out.write(part.read(max_bytes - out.tell()))
    return dest


def fio_unavailable_reason(fio_tree: Path) -> str | None:
    """Why fio cannot run over ``fio_tree / FIO_FILE``, or None when it can."""
    if shutil.which("fio") is None:
        return "fio is not installed"
    size = (fio_tree / FIO_FILE).stat().st_size
    if size < PAGE_BYTES:  # fio: "blocksize is larger than data set range"
        return f"the source holds {size} bytes, less than one 4 KiB block for fio"
    return None


def run_fio(mountpoint: Path, big_file: str, reads: int, seed: int, cgroup: Any = None) -> dict[str, Any]:
    """fio randread with a zipf distribution over one file of the mount (inside ``cgroup``, a
    ``guestmem.MemoryCgroup``, when given).

    fio checks no bytes here, so ``wrong_reads`` is None (not 0): nothing was verified."""
    size = (mountpoint / big_file).stat().st_size
    command = ["fio", "--name=zipf", f"--filename={mountpoint / big_file}", "--rw=randread", "--bs=4k",
               "--random_distribution=zipf:0.9", f"--number_ios={reads}", f"--io_size={reads * PAGE_BYTES * 4}",
               f"--size={size // PAGE_BYTES * PAGE_BYTES}", f"--randseed={seed}", "--ioengine=psync",
               "--output-format=terse"]
    started = time.perf_counter()
    if cgroup is None:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        stderr = done.stderr
    else:
        from .guestmem import run_in_cgroup

        ran = run_in_cgroup(cgroup, command, timeout=300)
        done, stderr = ran, ran.stderr.decode(errors="replace")
    if done.returncode != 0:
        raise FioError(f"fio failed: {(stderr.strip().splitlines() or ['?'])[-1]}")
    return {"workload": "fio", "reads": reads, "wrong_reads": None, "seconds": time.perf_counter() - started}


def mount_args(page_cache_pages: int, tmem_pages: int, *, abi: str = "v1", fold: str = "xxh64",
               compress: bool = False, first_chance: str = "daemon", backing_direct: bool = False,
               threads: str = "single") -> list[str]:
    """The ``guestfs mount`` options of one live run.

    first_chance "daemon" (the lab's default): every read reaches the daemon, so hits and misses
    are counted exactly; "kernel": the kernel's page cache serves repeated reads (then there is no
    page cache of ours to size, and the kernel's hits are not counted)."""
    args = ["--first-chance", first_chance, "--tmem", f"{max(tmem_pages, 1) * 4}K", "--abi", abi,
            "--v0-fold", fold, "--threads", threads]
    if first_chance == "daemon":
        args[2:2] = ["--page-cache", f"{page_cache_pages * 4}K"]
    return args + (["--compress"] if compress else []) + (["--backing-direct"] if backing_direct else [])


def live_run(
    source: Path,
    plan: ReadPlan,
    *,
    page_cache_pages: int = 256,
    tmem_pages: int = 4096,
    abi: str = "v1",
    fold: str = "xxh64",
    compress: bool = False,
    fio_file: str | None = None,
    seed: int = 1,
    timeout: float = 20.0,
    first_chance: str = "daemon",
    backing_direct: bool = False,
    threads: str = "single",
    guest_memory: int | None = None,
) -> dict[str, Any]:
    """Mount ``source``, run the workload, return the workload result plus the daemon's stats.

    With ``fio_file`` (a file of ``source``, see ``make_fio_tree``) fio reads that file and
    ``plan`` only gives the number of reads; otherwise the built-in reader executes ``plan``.
    With ``guest_memory`` (bytes) the workload runs as a separate process in a memory cgroup of
    that size (``guestmem``): fio itself, or the reader script (``reader.py``), which checks every
    page against xxh64 digests of the backing files made beforehand; the result then has the
    cgroup's usage under "guest"."""
    from guestfs.mount import start_mount
    from guestfs.pageio import wait_until_cacheable

    # Files changed within the last second are served but not cached (a writer may still be copying):
    # let a just-made tree settle so every run caches from its first read, as a long-lived tree would.
    wait_until_cacheable(*(source / name for name in ([fio_file] if fio_file else plan.files)))
    with tempfile.TemporaryDirectory(prefix="guestfs-lab-mnt-") as mountpoint:
        args = mount_args(page_cache_pages, tmem_pages, abi=abi, fold=fold, compress=compress,
                          first_chance=first_chance, backing_direct=backing_direct, threads=threads)
        handle = start_mount(str(source), mountpoint, args, timeout=timeout)
        try:
            if guest_memory is not None:
                workload = run_in_guest(Path(mountpoint), source, plan, fio_file, seed, guest_memory)
            elif fio_file is not None:
                workload = run_fio(Path(mountpoint), fio_file, len(plan.reads), seed)
            else:
                workload = run_reads(Path(mountpoint), source, plan)
            stats = handle.stats()
            if fio_file is not None:  # what fio issued, as the daemon counted it
                workload["reads"] = int(stats.get("reads", workload["reads"]))
        finally:
            handle.unmount(timeout=timeout)
    # The run went through: its daemon log (one per scratch mountpoint) holds nothing worth keeping.
    # A run that failed raised above and keeps its log, which its error message names.
    Path(handle.log_path).unlink(missing_ok=True)
    return {"page_cache_pages": page_cache_pages, "tmem_pages": tmem_pages, "abi": abi, "fold": fold,
            "compress": compress, "first_chance": first_chance, "backing_direct": backing_direct, **workload,
            "stats": stats}


def page_digests(source: Path, plan: ReadPlan) -> tuple[array, list[int]]:
    """xxh64 of every page of every plan file, and where each file's pages start in that array."""
    import xxhash

    digests, first_page = array("Q"), []
    for name in plan.files:
        first_page.append(len(digests))
        with open(source / name, "rb") as backing:
            while page := backing.read(PAGE_BYTES):
                digests.append(xxhash.xxh64_intdigest(page))
        if len(digests) == first_page[-1]:  # an empty file: its one planned page reads b""
            digests.append(xxhash.xxh64_intdigest(b""))
    return digests, first_page


def run_in_guest(mountpoint: Path, source: Path, plan: ReadPlan, fio_file: str | None, seed: int,
                 guest_memory: int, timeout: float = 300.0) -> dict[str, Any]:
    """The workload as a separate process in a fresh memory cgroup of ``guest_memory`` bytes."""
    from . import guestmem, reader

    with tempfile.TemporaryDirectory(prefix="guestfs-lab-reader-") as scratch_name:
        scratch = Path(scratch_name)
        with guestmem.guest_memory(guest_memory) as cgroup:
            if fio_file is not None:
                workload = run_fio(mountpoint, fio_file, len(plan.reads), seed, cgroup=cgroup)
            else:
                digests, first_page = page_digests(source, plan)
                with open(scratch / "digests.bin", "wb") as out:
                    digests.tofile(out)
                spec = reader.write_spec(str(scratch / "spec.json"), {
                    "root": str(mountpoint), "files": plan.files, "check": "digests", "direct": False,
                    "sequence": reader.write_sequence(str(scratch / "sequence.bin"), plan.reads),
                    "digests": str(scratch / "digests.bin"), "first_page": first_page})
                done = guestmem.run_in_cgroup(cgroup, [sys.executable, "-I", reader.__file__, spec], timeout=timeout)
                if done.returncode != 0:
                    raise RuntimeError(f"reader failed ({done.returncode}): "
                                       f"{(done.stderr.decode().strip().splitlines() or ['?'])[-1]}")
                result = json.loads(done.stdout.decode().strip().splitlines()[-1])
                workload = {"workload": "builtin", "reads": result["reads"], "wrong_reads": result["wrong_reads"],
                            "seconds": result["seconds"],
                            "reads_per_second": result["reads"] / result["seconds"] if result["seconds"] else 0.0}
            workload["guest"] = cgroup.usage().to_dict()
    return workload


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
    guest = run.get("guest") or {}
    for name in ("limit_bytes", "peak_bytes", "file_bytes"):
        if name in guest:
            row[f"guest_{name}"] = guest[name]
    row.pop("guest", None)
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


def _sweep(args: argparse.Namespace, tree: Path, plan: ReadPlan, sizes: list[int],
           fio_file: str | None) -> list[dict[str, Any]]:
    runs = []
    modes = [False, True] if args.compress else [False]
    with report.Progress(len(plan.reads) * len(sizes) * len(modes), "live mounts", quiet=args.quiet) as bar:
        for compress in modes:
            for tmem_pages in sizes:
                runs.append(live_run(tree, plan, page_cache_pages=args.page_cache, tmem_pages=tmem_pages,
                                     compress=compress, fio_file=fio_file, seed=args.seed,
                                     first_chance=args.first_chance or "daemon", backing_direct=bool(args.backing_direct),
                                     threads=args.threads, guest_memory=args.guest_memory))
                bar(len(plan.reads))
    return runs


def run_sweep(args: argparse.Namespace, source: Path, plan: ReadPlan, sizes: list[int],
              scratch: Path) -> tuple[list[dict[str, Any]], str | None]:
    """The runs, and why fio was wanted but not used (None when fio ran or was not wanted).

    fio mounts a private scratch tree (``make_fio_tree``); the built-in reader mounts ``source``
    itself, read-only. If fio cannot run -- or fails in any run -- the whole sweep is done by
    the built-in reader, so all rows come from the same workload."""
    if args.workload == "builtin":
        return _sweep(args, source, plan, sizes, None), None
    fio_tree = make_fio_tree(source, scratch / "fio")
    reason = fio_unavailable_reason(fio_tree)
    if reason is None:
        try:
            return _sweep(args, fio_tree, plan, sizes, FIO_FILE), None
        except FioError as exc:
            reason = str(exc)
    return _sweep(args, source, plan, sizes, None), reason


def run_live_experiment(args: argparse.Namespace, out: Path) -> str:
    """``guestfs lab live``: a tmem sweep (and compression) through real mounts; ``--source`` is never written.

    With ``--value-table``: the value table instead (``value.value_table``)."""
    if args.value_table:
        return run_value_table(args, out)[0]
    sizes = args.tmem_sizes if args.tmem_sizes != "auto" else [0, 1024, 4096, 16384]
    with tempfile.TemporaryDirectory(prefix="guestfs-lab-src-") as scratch:
        source = args.source or make_text_tree(Path(scratch) / "src", args.files or SWEEP_FILES, seed=args.seed)
        plan = plan_reads(source, args.reads or SWEEP_READS, seed=args.seed)
        runs, fio_fallback = run_sweep(args, source, plan, sizes, Path(scratch))
    used_fio = runs[0]["workload"] == "fio"
    rows = [flatten(run) for run in runs]
    report.write_csv(out / "live.csv", rows)
    report.write_json(out / "live.json", {"meta": report.run_metadata(), "distinct_pages": plan.distinct_pages,
                                          "workload": runs[0]["workload"], "fio_fallback_reason": fio_fallback,
                                          "runs": runs})
    for compress in sorted({r["compress"] for r in rows}):
        subset = [r for r in rows if r["compress"] == compress]
        plots.plot_curves(out / f"live{'-compress' if compress else ''}.png", "live mount: tmem hit ratio",
                          "tmem size (pages)", {"tmem hits / reads": ([r["tmem_pages"] for r in subset],
                                                                      [r.get("tmem_hit_ratio", 0.0) for r in subset])})
    columns = ["tmem_pages", "compress", "reads", "wrong_reads", "page_cache_hits", "succ_gets", "hit_ratio",
               "backing_bytes_read", "host_used_bytes", "host_compressed_pages"]
    if args.guest_memory is not None:
        columns += ["seconds", "guest_peak_bytes", "guest_file_bytes"]
    if used_fio:
        workload = (f"fio randread zipf:0.9 over {FIO_FILE}, a scratch file concatenated from the source's files "
                    "(fio checks no bytes: wrong_reads n/a)")
    else:
        checked = "the backing file's page digests" if args.guest_memory is not None else "the backing file"
        workload = (f"built-in zipf(0.9) reader over {len(plan.files)} files ({plan.distinct_pages:,} distinct "
                    f"pages), every read checked against {checked}")
        if fio_fallback is not None:
            workload += f" (fio could not run: {fio_fallback}; used the built-in reader instead)"
    shown = [{**row, "wrong_reads": "n/a (fio)"} if row["wrong_reads"] is None else row for row in rows]
    shown = [{**row, "seconds": f"{row['seconds']:.3f}"} for row in shown]  # not a ratio: never as a percentage
    first_chance = args.first_chance or "daemon"
    setup = (f"page cache {args.page_cache} pages" if first_chance == "daemon" else "--first-chance kernel")
    setup += " --backing-direct" if args.backing_direct else ""
    if args.guest_memory is not None:
        setup += f"; the workload ran in a {args.guest_memory >> 20} MiB memory cgroup"
    body = (f"{len(plan.reads):,} 4 KiB reads per run: {workload}; {setup}.\n\n"
            + report.markdown_table(shown, columns))
    report.write_summary(out / "summary.md", "Live mount: tmem sweep", [("Runs", body)])
    return body


def run_value_table(args: argparse.Namespace, out: Path) -> tuple[str, int]:
    """``guestfs lab live --value-table``: ``value.value_table`` with the command's options; the
    summary and the number of wrong reads (pages whose bytes were not theirs) over all rows."""
    from .value import (DEFAULT_GUEST_MEMORY, DEFAULT_TMEM_FACTORS, VALUE_FILES, value_latencies, value_table,
                        write_value_outputs)

    def note(row: str) -> None:
        if not args.quiet:
            print(f"value table: {row} ...", file=sys.stderr, flush=True)

    table = value_table(args.guest_memory or DEFAULT_GUEST_MEMORY, tmem_factors=args.tmem_factors or DEFAULT_TMEM_FACTORS,
                        reads=args.reads, seed=args.seed, files=args.files or VALUE_FILES,
                        first_chance=args.first_chance or "kernel",
                        backing_direct=True if args.backing_direct is None else args.backing_direct,
                        threads=args.threads, baselines=not args.no_baselines, warmup=not args.no_warmup,
                        progress=note)
    wrong = sum(row["wrong_reads"] + row["warmup_wrong_reads"] for row in table["rows"])
    latencies = None
    if args.profile:
        note("latency profile")
        latencies = value_latencies(seed=args.seed)
    return write_value_outputs(table, out, latencies), wrong
