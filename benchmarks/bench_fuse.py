"""FUSE read benchmark: guestfs (first-chance hits, tmem hits, misses) vs bindfs vs direct reads.

All cases run in the same process, interleaved round by round, on the same files:

* ``direct``         pread on the backing file (ext4, kernel page cache warm)
* ``bindfs``         C FUSE passthrough (Debian's bindfs, libfuse2), mounted with ``-o direct_io`` so the
                     kernel page cache does not absorb its reads either (apples to apples with guestfs)
* ``mfusepy-min``    a minimal mfusepy passthrough (open/read/release, direct_io, single-threaded, no
                     cache): the floor of any Python FUSE read on this binding, to separate the binding's
                     cost from guestfs' own
* ``guestfs-fc``     first-chance cache larger than the data: every read is a first-chance hit
* ``guestfs-tmem``   first-chance cache of 8 pages, tmem larger than the data: reads are tmem hits
* ``guestfs-miss``   8-page first-chance cache, 1-page tmem: reads go to the backing file

Each guestfs case prints the fraction of its timed reads (random) and of the pages it read
(sequential) that the intended tier served, from the mount's own counters, so the isolation is
checked, not assumed (sequential fractions can exceed 100 %: a page straddling two FUSE requests is
served twice). ``--in-process`` adds ``Ops.read`` without FUSE for the same three tiers: the 4 KiB
median, how much of it is spent inside the host's ``do_tmem_op`` and in ``fstat``, and 1 MiB
sequential speed, to show where the time goes.

Usage: python benchmarks/bench_fuse.py [--reads 4000] [--rounds 5] [--in-process] [--pin-cpu 0]
                                      [--record docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from guestfs.mount import MountHandle, is_live, start_mount, unmount  # noqa: E402
from guestfs.pageio import wait_until_cacheable  # noqa: E402

PAGE = 4096
SECTION = "## guestfs (bench_fuse.py)"
LATEST = "### Latest run (bench_fuse.py)"

GUESTFS_CASES = {
    "guestfs-fc": ["--first-chance", "daemon", "--page-cache", "128M", "--tmem", "4K"],
    "guestfs-tmem": ["--first-chance", "daemon", "--page-cache", "32K", "--tmem", "128M"],
    "guestfs-miss": ["--first-chance", "daemon", "--page-cache", "32K", "--tmem", "4K"],
}
TIER_COUNTERS = {"guestfs-fc": "page_cache_hits", "guestfs-tmem": "succ_gets", "guestfs-miss": "backing_reads"}
# Sequential reads count pages, not requests: a miss of a whole 1 MiB read is one backing pread.
SEQ_TIER_PAGES = {"guestfs-fc": ("page_cache_hits", 1), "guestfs-tmem": ("succ_gets", 1),
                  "guestfs-miss": ("backing_bytes_read", PAGE)}


@dataclass
class Case:
    name: str
    root: Path
    handle: MountHandle | None = None
    latencies_ns: list[int] = field(default_factory=list)
    round_medians_us: list[float] = field(default_factory=list)
    round_ops: list[float] = field(default_factory=list)
    seq_mib_s: list[float] = field(default_factory=list)
    tier_fraction: list[float] = field(default_factory=list)
    seq_tier_fraction: list[float] = field(default_factory=list)


def random_reads(path: Path, offsets: list[int], case: Case) -> None:
    fd = os.open(path, os.O_RDONLY)
    latencies: list[int] = []
    clock = time.perf_counter_ns
    try:
        start = clock()
        for offset in offsets:
            t0 = clock()
            os.pread(fd, PAGE, offset)
            latencies.append(clock() - t0)
        case.round_ops.append(len(offsets) / ((clock() - start) / 1e9))
    finally:
        os.close(fd)
    case.latencies_ns += latencies
    case.round_medians_us.append(statistics.median(latencies) / 1000)


def sequential_read(path: Path) -> float:
    """MiB/s of one unbuffered pass with a 1 MiB buffer (fresh open, like cat with a big buffer)."""
    buffer = bytearray(1 << 20)
    total = 0
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            total += count
    return total / (1 << 20) / (time.perf_counter() - start)


def mount_bindfs(source: Path, mnt: Path) -> None:
    subprocess.run(["bindfs", "--no-allow-other", "-o", "direct_io", str(source), str(mnt)], check=True, timeout=30)
    deadline = time.monotonic() + 10
    while not is_live(str(mnt)):
        if time.monotonic() > deadline:
            raise RuntimeError("bindfs mount did not come up")
        time.sleep(0.02)


def serve_minimal(source: str, mountpoint: str) -> None:
    """The ``mfusepy-min`` daemon (run as ``bench_fuse.py --serve-minimal SRC MNT``)."""
    os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    import mfusepy

    class Minimal(mfusepy.Operations):  # type: ignore[misc]
        use_ns = True

        def getattr(self, path: str, fh: object = None) -> dict[str, int]:
            st = os.lstat(source + path)
            return {key: getattr(st, key) for key in ("st_mode", "st_ino", "st_nlink", "st_size", "st_uid", "st_gid")}

        def readdir(self, path: str, fh: int) -> list[str]:
            return [".", "..", *os.listdir(source + path)]

        def open(self, path: str, fi: object) -> int:
            fi.fh = os.open(source + path, os.O_RDONLY)  # type: ignore[attr-defined]
            fi.direct_io = 1  # type: ignore[attr-defined]
            return 0

        def read(self, path: str, size: int, offset: int, fi: object) -> bytes:
            return os.pread(fi.fh, size, offset)  # type: ignore[attr-defined]

        def release(self, path: str, fi: object) -> int:
            os.close(fi.fh)  # type: ignore[attr-defined]
            return 0

    mfusepy.FUSE(Minimal(), mountpoint, raw_fi=True, foreground=True, nothreads=True, auto_unmount=True,
                 attr_timeout=1, entry_timeout=1)


def mount_minimal(source: Path, mnt: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, __file__, "--serve-minimal", str(source), str(mnt)],
                                   stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while not is_live(str(mnt)):
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError(f"minimal mfusepy mount did not come up; see {log}")
        time.sleep(0.02)
    return process


def tier_counter(case: Case) -> int:
    assert case.handle is not None
    return int(case.handle.stats()[TIER_COUNTERS[case.name]])


def seq_tier_pages(case: Case) -> int:
    assert case.handle is not None
    counter, unit = SEQ_TIER_PAGES[case.name]
    return int(case.handle.stats()[counter]) // unit


def percentile(values: list[int], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] / 1000


def run(args: argparse.Namespace) -> str:
    work = Path(tempfile.mkdtemp(prefix="bench-fuse-", dir=args.workdir))
    source = work / "src"
    source.mkdir()
    rng = random.Random(42)
    (source / "random.bin").write_bytes(rng.randbytes(args.working_set_mib << 20))
    (source / "seq.bin").write_bytes(rng.randbytes(args.seq_mib << 20))
    wait_until_cacheable(source)  # guestfs caches a file from a read a second after its last change
    pages = (args.working_set_mib << 20) // PAGE
    offsets = [rng.randrange(pages) * PAGE for _ in range(args.reads)]

    cases = [Case("direct", source)]
    minimal: subprocess.Popen[bytes] | None = None
    try:
        if shutil.which("bindfs"):
            (work / "bindfs").mkdir()
            mount_bindfs(source, work / "bindfs")
            cases.append(Case("bindfs", work / "bindfs"))
        (work / "mfusepy-min").mkdir()
        minimal = mount_minimal(source, work / "mfusepy-min", work / "minimal.log")
        cases.append(Case("mfusepy-min", work / "mfusepy-min"))
        for name, options in GUESTFS_CASES.items():
            (work / name).mkdir()
            handle = start_mount(str(source), str(work / name), options, timeout=30,
                                 log_path=str(work / f"{name}.log"))
            cases.append(Case(name, work / name, handle))
        for case in cases:  # warm-up: kernel page cache, daemons, and each guestfs cache tier
            for _ in range(2):
                sequential_read(case.root / "random.bin")
                sequential_read(case.root / "seq.bin")
            random_reads(case.root / "random.bin", offsets[:500], Case("warm", case.root))
        for _ in range(args.rounds):
            for case in cases:
                before = tier_counter(case) if case.handle else 0
                random_reads(case.root / "random.bin", offsets, case)
                if case.handle:
                    case.tier_fraction.append((tier_counter(case) - before) / len(offsets))
            for case in cases:
                before = seq_tier_pages(case) if case.handle else 0
                case.seq_mib_s += [sequential_read(case.root / "seq.bin") for _ in range(args.seq_passes)]
                if case.handle:
                    pages = args.seq_passes * (args.seq_mib << 20) // PAGE
                    case.seq_tier_fraction.append((seq_tier_pages(case) - before) / pages)
    finally:
        for case in cases:
            if case.handle:
                case.handle.unmount()
        for name in ("bindfs", "mfusepy-min"):
            if (work / name).exists() and is_live(str(work / name)):
                unmount(str(work / name))
        if minimal is not None:
            minimal.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
    report = format_report(cases, args)
    if args.in_process:
        report += "\n" + in_process_breakdown(args)
    return report


def format_report(cases: list[Case], args: argparse.Namespace) -> str:
    by_name = {case.name: case for case in cases}
    base = statistics.median(by_name["bindfs"].latencies_ns) if "bindfs" in by_name else None
    direct = statistics.median(by_name["direct"].latencies_ns)
    lines = [f"random 4 KiB preads: {args.reads} per round x {args.rounds} rounds, working set "
             f"{args.working_set_mib} MiB; sequential: {args.seq_mib} MiB file, 1 MiB reads",
             "",
             "| case | median µs | round medians µs (min–max) | p90 µs | ops/s (median round) | × bindfs (median "
             "latency) | served by intended tier |",
             "|---|---|---|---|---|---|---|"]
    for case in cases:
        median = statistics.median(case.latencies_ns)
        ratio = f"{median / base:.2f}" if base else "n/a"
        tier = f"{statistics.median(case.tier_fraction):.1%}" if case.tier_fraction else "-"
        lines.append(f"| {case.name} | {median / 1000:.1f} | {min(case.round_medians_us):.1f}–"
                     f"{max(case.round_medians_us):.1f} | {percentile(case.latencies_ns, 0.9):.1f} | "
                     f"{statistics.median(case.round_ops):,.0f} | {ratio} | {tier} |")
    seq_base = statistics.median(by_name["bindfs"].seq_mib_s) if "bindfs" in by_name else None
    lines += ["", "| case | sequential MiB/s (median) | min–max | × bindfs | × direct | "
              "pages served by intended tier |", "|---|---|---|---|---|---|"]
    seq_direct = statistics.median(by_name["direct"].seq_mib_s)
    for case in cases:
        speed = statistics.median(case.seq_mib_s)
        ratio = f"{speed / seq_base:.2f}" if seq_base else "n/a"
        tier = f"{statistics.median(case.seq_tier_fraction):.1%}" if case.seq_tier_fraction else "-"
        lines.append(f"| {case.name} | {speed:,.0f} | {min(case.seq_mib_s):,.0f}–{max(case.seq_mib_s):,.0f} | "
                     f"{ratio} | {speed / seq_direct:.2f} | {tier} |")
    lines.append("")
    lines.append(f"direct pread median: {direct / 1000:.2f} µs")
    lines.append("")
    return "\n".join(lines)


def in_process_breakdown(args: argparse.Namespace) -> str:
    """Ops.read per tier without FUSE, split into host time and the rest; PageIO sequential speed."""
    from guestfs.filekey import key_for_fd, key_for_path
    from guestfs.ops import Ops
    from guestfs.stack import StackConfig, build_stack

    @dataclass
    class FileInfo:
        flags: int
        fh: int = 0
        direct_io: int = 0

    configs = {"fc": StackConfig(page_cache_pages=4096, tmem_pages=1, abi="v1"),
               "tmem": StackConfig(page_cache_pages=8, tmem_pages=4096, abi="v1"),
               "miss": StackConfig(page_cache_pages=8, tmem_pages=1, abi="v1")}
    lines = ["| in-process (no FUSE) | Ops.read 4 KiB median µs | of which in the host (do_tmem_op) µs | "
             "of which fstat µs | Ops.read 1 MiB sequential MiB/s |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        data = Path(work) / "data.bin"
        data.write_bytes(os.urandom(8 << 20))
        wait_until_cacheable(data)
        rng = random.Random(1)
        offsets = [rng.randrange(2048) * PAGE for _ in range(args.reads)]
        for name, config in configs.items():
            stack = build_stack(config)
            ops = Ops(work, stack.pageio, key_for_fd=key_for_fd, key_for_path=key_for_path)
            fi = FileInfo(flags=os.O_RDONLY)
            ops.open("/data.bin", fi)
            for offset in range(0, 8 << 20, PAGE):
                ops.read("/data.bin", PAGE, offset, fi)
            timings = []
            clock = time.perf_counter_ns
            for offset in offsets:
                t0 = clock()
                ops.read("/data.bin", PAGE, offset, fi)
                timings.append(clock() - t0)
            host_us = _host_time_per_read(stack, lambda offset: ops.read("/data.bin", PAGE, offset, fi), offsets)
            fd = os.open(data, os.O_RDONLY)
            fstat_us = min(timeit.repeat(lambda: os.fstat(fd), number=2000, repeat=5)) / 2000 * 1e6
            os.close(fd)
            seq = []
            for _ in range(5):
                t0 = clock()
                for offset in range(0, 8 << 20, 1 << 20):
                    ops.read("/data.bin", 1 << 20, offset, fi)
                seq.append(8 / ((clock() - t0) / 1e9))
            ops.release("/data.bin", fi)
            stack.close()
            lines.append(f"| {name} | {statistics.median(timings) / 1000:.1f} | {host_us:.1f} | {fstat_us:.1f} | "
                         f"{statistics.median(seq):,.0f} |")
    return "\n".join(lines)


def _host_time_per_read(stack: object, read: Callable[[int], object], offsets: list[int]) -> float:
    """Median µs per read spent inside the host's ``do_tmem_op`` (timed around each transport call)."""
    transport = stack.transport  # type: ignore[attr-defined]
    inner = transport.call
    spent = [0]
    clock = time.perf_counter_ns

    def timed_call(op: bytes, page: bytearray | None = None) -> int:
        t0 = clock()
        try:
            return inner(op, page)  # type: ignore[no-any-return]
        finally:
            spent[0] += clock() - t0

    per_read = []
    transport.call = timed_call
    try:
        for offset in offsets:
            spent[0] = 0
            read(offset)
            per_read.append(spent[0])
    finally:
        transport.call = inner
    return statistics.median(per_read) / 1000


def record(doc: Path, report: str) -> None:
    """Replace only the "latest run" part of this benchmark's section of ``doc`` (hand-written analysis stays)."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    command = " ".join(["python", "benchmarks/bench_fuse.py", *sys.argv[1:]])
    latest = (f"{LATEST}\n\nMeasured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on "
              f"{os.cpu_count()} vCPUs with `{command}`.\n\n{report}\n")
    if SECTION not in text:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n(analysis: see below)\n\n{latest}"
    elif LATEST not in text:
        end = _next_heading(text, text.find(SECTION) + len(SECTION), "\n## ")
        text = text[:end].rstrip("\n") + f"\n\n{latest}\n" + text[end:].lstrip("\n")
    else:
        start = text.find(LATEST)
        end = min(_next_heading(text, start + len(LATEST), "\n## "), _next_heading(text, start + len(LATEST), "\n### "))
        text = text[:start] + latest + ("\n" + text[end:].lstrip("\n") if end < len(text) else "")
    doc.write_text(text)


def _next_heading(text: str, start: int, marker: str) -> int:
    found = text.find(marker, start)
    return len(text) if found < 0 else found + 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=4000, help="random reads per case per round (default: 4000)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    parser.add_argument("--working-set-mib", type=int, default=8, help="random-read file size (default: 8)")
    parser.add_argument("--seq-mib", type=int, default=32, help="sequential file size (default: 32)")
    parser.add_argument("--seq-passes", type=int, default=3, help="sequential passes per case per round (default: 3)")
    parser.add_argument("--workdir", default=None, help="where to put scratch files (default: $TMPDIR)")
    parser.add_argument("--in-process", action="store_true", help="also time Ops.read without FUSE")
    parser.add_argument("--record", metavar="DOC", default=None, help="write the result section into DOC")
    parser.add_argument("--pin-cpu", type=int, default=None, metavar="N",
                        help="run everything (this process, the daemons, the readers) on CPU N: on a shared VM, "
                             "cross-CPU wake-ups make some rounds 3-5x slower for every Python daemon")
    parser.add_argument("--serve-minimal", nargs=2, metavar=("SRC", "MNT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_minimal:
        serve_minimal(*args.serve_minimal)
        return 0
    if args.pin_cpu is not None:
        os.sched_setaffinity(0, {args.pin_cpu})  # inherited by every mount daemon started below
    report = run(args)
    print(report)
    if args.record:
        record(Path(args.record), report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
