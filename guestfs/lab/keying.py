"""The v0-vs-v1 keying study: how files would be keyed in tmem, and where v0's 64-bit folds collide.

v1 keys a file by its 192-bit oid (the kernel file handle, as Linux's cleancache_filekey); v0
has one u64 object id, so a guest must fold: ``ino`` (the inode number alone, as v0-era guests
did) or ``xxh64`` (a hash of the full identity). One tmem pool serves the whole backing tree,
so two different files whose folded ids are equal would read each other's pages without the
frontend's collision guard.

Part (a) works on any directory (nothing is mounted): ``keying_table(paths)`` gives one row per
tree with file counts, key sources, handle types and sizes, and collision counts per fold;
``inode_reuse(scratch_dir)`` shows st_ino reuse after delete-and-create with different handles.
Part (b), ``live_keying(tree)``, reads the same seeded pages through real mounts with v1 and each
v0 fold and reports, per mount, the puts its collision guard refused. ``stream_sizes`` saves a
persistent pool built for the purpose (N pages, M objects) as v1 and as v0. The command writes
keying.csv (+ keying-live.csv), keying.json, keying.png (+ keying-live.png) and summary.md.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import xxhash

from guestfs.filekey import FileKey, key_for_path

FOLDS = ("ino", "xxh64")


def fold_oid(key: FileKey, fold: str) -> int:
    """The 64-bit v0 object id of a key under a fold (mirrors the cleancache frontend)."""
    if fold == "ino":
        return key.ino & 0xFFFF_FFFF_FFFF_FFFF
    if fold == "xxh64":
        return xxhash.xxh64_intdigest(key.identity_bytes())
    raise ValueError(f"unknown v0 fold {fold!r} (choose from {', '.join(FOLDS)})")


def regular_files(tree: Path, limit: int) -> Iterator[Path]:
    """Regular files under ``tree`` (symlinks not followed), at most ``limit``."""
    seen = 0
    for root, dirs, files in os.walk(tree):
        dirs.sort()
        for name in sorted(files):
            path = Path(root, name)
            if path.is_symlink() or not path.is_file():
                continue
            yield path
            seen += 1
            if seen >= limit:
                return


def collisions(values: dict[FileKey, int]) -> int:
    """How many distinct keys share a folded value with an earlier key (0 = collision-free)."""
    groups: dict[int, int] = defaultdict(int)
    for value in values.values():
        groups[value] += 1
    return sum(count - 1 for count in groups.values() if count > 1)


def study_tree(tree: Path, limit: int = 200_000) -> dict[str, Any]:
    """One row of the keying table for a directory tree."""
    keys: set[FileKey] = set()
    unreadable = 0
    total_bytes = 0
    for path in regular_files(tree, limit):
        try:
            keys.add(key_for_path(str(path)))
            total_bytes += path.stat().st_size
        except OSError:
            unreadable += 1  # permission or vanished: counted, not keyed
    sources = Counter(key.source for key in keys)
    handle_types = Counter(key.handle_type for key in keys)
    handle_sizes = Counter(len(key.handle) for key in keys)
    row: dict[str, Any] = {
        "tree": str(tree),
        "files": len(keys),
        "unreadable": unreadable,
        "bytes": total_bytes,
        "devices": len({key.dev for key in keys}),
        "sources": dict(sorted(sources.items())),
        "handle_types": {f"{t:#x}" if t >= 0 else "none": n for t, n in sorted(handle_types.items())},
        "handle_sizes": dict(sorted(handle_sizes.items())),
        "v1_collisions": collisions({key: key.oid for key in keys}),
    }
    for fold in FOLDS:
        row[f"v0_{fold}_collisions"] = collisions({key: fold_oid(key, fold) for key in keys})
    return row


def keying_table(paths: list[Path], limit: int = 200_000) -> list[dict[str, Any]]:
    """One row per tree: files, key sources, handle types/sizes, collisions of v1 and each v0 fold."""
    return [study_tree(Path(p), limit) for p in paths]


def format_table(rows: list[dict[str, Any]]) -> str:
    """The keying table for a terminal."""
    header = ("tree", "files", "handles (type:bytes)", "v1 coll.", "v0 ino coll.", "v0 xxh64 coll.")
    body = []
    for row in rows:
        types = ",".join(f"{t}" for t in row["handle_types"])
        sizes = ",".join(f"{s}" for s in row["handle_sizes"])
        body.append(
            (
                row["tree"],
                f"{row['files']:,}",
                f"{types}:{sizes}",
                f"{row['v1_collisions']:,}",
                f"{row['v0_ino_collisions']:,}",
                f"{row['v0_xxh64_collisions']:,}",
            )
        )
    widths = [max(len(str(cells[i])) for cells in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
             for cells in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def inode_reuse(scratch_parent: Path, attempts: int = 64) -> dict[str, Any]:
    """Create and delete files in a scratch dir under ``scratch_parent`` and record st_ino reuse.

    A reused inode number with a different file handle (generation) is exactly the case where a
    v0 ``ino`` fold would serve the deleted file's pages to the new one.
    """
    examples: list[dict[str, Any]] = []
    reused = oid_reused = 0
    with tempfile.TemporaryDirectory(prefix=".guestfs-keying-", dir=scratch_parent) as scratch:
        previous: FileKey | None = None
        for attempt in range(attempts):
            path = Path(scratch, f"f{attempt % 2}")
            path.write_bytes(b"x" * 10)
            key = key_for_path(str(path))
            path.unlink()
            if previous is not None and key.ino == previous.ino:
                reused += 1
                oid_reused += key.oid == previous.oid
                if len(examples) < 5:
                    examples.append(
                        {
                            "ino": key.ino,
                            "old_handle": previous.handle.hex(),
                            "new_handle": key.handle.hex(),
                            "same_v1_oid": key.oid == previous.oid,
                            "same_ino_fold": fold_oid(key, "ino") == fold_oid(previous, "ino"),
                            "same_xxh64_fold": fold_oid(key, "xxh64") == fold_oid(previous, "xxh64"),
                        }
                    )
            previous = key
    return {
        "scratch_parent": str(scratch_parent),
        "attempts": attempts,
        "ino_reused": reused,
        "v1_oid_reused": oid_reused,
        "examples": examples,
    }


# --- record and save-stream sizes ---------------------------------------------------------------


def stream_sizes(pages: int, objects: int, *, source: str = "synthetic") -> dict[str, Any]:
    """Bytes per hypercall record, per save handle and per save stream, v1 against v0.

    The stream sizes come from a real save (``Tmem.save``, i.e. ``tmemcore.savestream``) of one
    client whose *persistent* pool holds ``pages`` zero pages spread over ``objects`` objects,
    created once as a v1 pool and once as a v0 pool. The pool is built here for the purpose: no
    tree or mount above is saved (``source`` says where ``pages``/``objects`` came from)."""
    import io

    from tmemcore import abi

    from .simulate import tmem_class

    sizes: dict[str, Any] = {"record_bytes_v1": abi.RECORD_SIZE[abi.SPEC_V1],
                             "record_bytes_v0": abi.RECORD_SIZE[abi.SPEC_V0],
                             "handle_bytes_v1": abi.HANDLE_SIZE[abi.SPEC_V1],
                             "handle_bytes_v0": abi.HANDLE_SIZE[abi.SPEC_V0],
                             "stream_pages": pages, "stream_objects": objects}
    per_object = max(1, -(-pages // max(objects, 1)))
    page = bytes(abi.PAGE_SIZE)
    for version, name in ((abi.SPEC_V1, "v1"), (abi.SPEC_V0, "v0")):
        host = tmem_class()(memory_pages=pages + 1, accept_v0=True)
        pool = host.client(1).new_pool(persistent=True, version=version)
        for n in range(pages):
            pool.put(1 + n // per_object, n % per_object, page)
        stream = io.BytesIO()
        host.save(1, stream)
        sizes[f"stream_bytes_{name}"] = len(stream.getvalue())
    sizes["stream_source"] = (f"Tmem.save of one client with a persistent pool of {pages:,} zero pages over "
                              f"{objects:,} objects, built once as a v1 and once as a v0 pool ({source})")
    return sizes


def format_sizes(sizes: dict[str, Any]) -> str:
    """The record/handle/stream sizes as a Markdown list, saying what the streams are."""
    lines = [f"- {sizes['stream_source']}:",
             f"  - save stream: v1 {sizes['stream_bytes_v1']:,} bytes, v0 {sizes['stream_bytes_v0']:,} bytes "
             f"({sizes['stream_bytes_v1'] - sizes['stream_bytes_v0']:+,} bytes for v1)",
             f"  - per hypercall record: v1 {sizes['record_bytes_v1']} bytes, v0 {sizes['record_bytes_v0']} bytes; "
             f"per save handle: v1 {sizes['handle_bytes_v1']} bytes, v0 {sizes['handle_bytes_v0']} bytes"]
    return "\n".join(lines)


def plot_keying(out: Path, rows: list[dict[str, Any]], live_rows: list[dict[str, Any]] | None) -> list[Path]:
    """keying.png: colliding files per scheme per tree; keying-live.png (with --live): tmem hits and
    guard-refused puts per ABI/fold. Returns the written paths (none without matplotlib)."""
    from . import plots

    written = [plots.plot_bars(out / "keying.png", "files whose key collides with another file's",
                               [Path(r["tree"]).name or r["tree"] for r in rows],
                               {"v1 (192-bit oid)": [r["v1_collisions"] for r in rows],
                                "v0 ino fold": [r["v0_ino_collisions"] for r in rows],
                                "v0 xxh64 fold": [r["v0_xxh64_collisions"] for r in rows]},
                               ylabel="colliding files")]
    if live_rows:
        written.append(plots.plot_bars(out / "keying-live.png", "live mounts: same reads, per ABI",
                                       [r["mode"] for r in live_rows],
                                       {"tmem hits (succ_gets)": [r["succ_gets"] for r in live_rows],
                                        "puts refused by the collision guard": [r["guard_refused_puts"]
                                                                                for r in live_rows]},
                                       ylabel="count"))
    return [path for path in written if path is not None]


# --- the command ----------------------------------------------------------------------------------


def scratch_parent_for(tree: Path) -> Path:
    """A writable directory on the same filesystem as ``tree`` (inode reuse is per filesystem):
    the temp dir when it shares the tree's device (so system trees are never written), else the
    tree itself when writable, else the temp dir (then the result is about the temp dir's fs)."""
    temp = Path(tempfile.gettempdir())
    if temp.stat().st_dev == tree.stat().st_dev or not os.access(tree, os.W_OK):
        return temp
    return tree


def measure_inode_reuse(parent: Path) -> dict[str, Any]:
    """``inode_reuse`` under ``parent``, or under the temp dir when files cannot be made there (a
    pseudo filesystem such as /proc or sysfs, a read-only mount that still says writable)."""
    try:
        return inode_reuse(parent)
    except OSError as exc:
        temp = Path(tempfile.gettempdir())
        if parent == temp:
            raise
        return dict(inode_reuse(temp), not_measured_under=str(parent), reason=exc.strerror or str(exc))


def run_keying_experiment(args: Any, out: Path) -> str:
    """``guestfs lab keying``: table of trees (+ btrfs), inode reuse, optional live comparison."""
    from . import report

    trees = [Path(t) for t in (args.tree or [Path("/usr/share")])]
    sections: list[tuple[str, str]] = []
    payload: dict[str, Any] = {"meta": report.run_metadata()}
    with _optional_btrfs(args.btrfs) as btrfs_root:
        if btrfs_root is not None:
            trees.append(btrfs_root)
        elif args.btrfs:
            sections.append(("btrfs", f"skipped: {payload.setdefault('btrfs_skipped', _btrfs_reason())}"))
        rows = keying_table(trees, limit=args.limit)
        if btrfs_root is not None:
            rows[-1]["tree"] = "btrfs image: subvolumes a, b"
        payload["trees"] = rows
        sections.append(("Keys of real trees (one tmem pool per tree)", "```\n" + format_table(rows) + "\n```"))
        scratch_parents: dict[Path, str] = {}  # one scratch dir per filesystem, named after its tree
        for tree, row in zip(trees, rows):
            scratch_parents.setdefault(scratch_parent_for(tree), row["tree"])
        reuse = [dict(measure_inode_reuse(parent), tree=label) for parent, label in scratch_parents.items()]
        payload["inode_reuse"] = reuse
        sections.append(("Inode reuse after delete-and-create", "\n".join(
            f"- {r['tree']} (scratch dir under {r['scratch_parent']}"
            + (f"; none could be made under {r['not_measured_under']}: {r['reason']}" if "reason" in r else "")
            + "): a new file got the deleted file's st_ino "
            f"in {r['ino_reused']}/{r['attempts']} creations (each one an `ino` fold collision); "
            f"its v1 oid equalled the old one {r['v1_oid_reused']} times" for r in reuse)))
        live_rows: list[dict[str, Any]] | None = None
        if args.live:
            live_rows = live_keying(btrfs_root or trees[0], seed=1)
            payload["live"] = live_rows
            sections.append(("Live mounts: v1 vs v0 folds", LIVE_NOTE + "\n\n" + report.markdown_table(
                live_rows, ["abi", "fold", "mode", "reads", "wrong_reads", "succ_gets", "tmem_hit_ratio",
                            "guard_refused_puts", "gets_skipped", "record_bytes"])))
    sizes = [stream_sizes(pages=4096, objects=64, source="synthetic: not taken from the trees or mounts above")]
    if live_rows:
        v1 = live_rows[0]
        sizes.append(stream_sizes(pages=v1["host_pages"], objects=v1["host_objects"],
                                  source="as many pages and objects as the v1 live run left in its ephemeral pool"))
    payload["sizes"] = sizes[0]
    payload["sizes_from_live"] = sizes[1] if len(sizes) > 1 else None
    sections.append(("Bytes per record and per save stream (v1 vs v0)", "\n".join(format_sizes(s) for s in sizes)))
    report.write_csv(out / "keying.csv", [{k: v for k, v in r.items() if not isinstance(v, dict)} for r in rows])
    if live_rows:
        report.write_csv(out / "keying-live.csv", live_rows)
    report.write_json(out / "keying.json", payload)
    pngs = plot_keying(out, rows, live_rows)
    if pngs:
        sections.append(("Plots", "\n".join(f"- ![{p.stem}]({p.name})" for p in pngs)))
    report.write_summary(out / "summary.md", "File keying: v1 (192-bit handles) vs v0 (64-bit folds)", sections)
    return "\n\n".join(f"## {h}\n\n{b}" for h, b in sections)


def _btrfs_reason() -> str:
    try:
        from guestfs.lab.btrfs import btrfs_unavailable_reason
    except ImportError:
        return "guestfs.lab.btrfs is not available"
    return btrfs_unavailable_reason() or "unknown"


class _optional_btrfs:
    """Context manager: the root of a two-subvolume btrfs image when asked and possible, else None."""

    def __init__(self, wanted: bool) -> None:
        self.wanted = wanted
        self._context: Any = None

    def __enter__(self) -> Path | None:
        if not self.wanted:
            return None
        try:
            from guestfs.lab.btrfs import btrfs_subvolume_image, btrfs_unavailable_reason
        except ImportError:
            return None
        if btrfs_unavailable_reason() is not None:
            return None
        self._scratch = tempfile.TemporaryDirectory(prefix="guestfs-lab-btrfs-")
        self._context = btrfs_subvolume_image(Path(self._scratch.name))
        image = self._context.__enter__()
        return Path(getattr(image, "mountpoint", getattr(image, "root", image)))

    def __exit__(self, *exc: object) -> None:
        if self._context is not None:
            self._context.__exit__(*exc)
            self._scratch.cleanup()


LIVE_NOTE = (
    "`guard_refused_puts` = `fold_collisions` + `oid_collisions` from the mount's cleancache stats: puts the "
    "frontend's collision guard dropped because the page's (folded) object id was already owned by another file. "
    "Without the guard each would have put that page into the other file's tmem object, so a later get could have "
    "returned the wrong file's bytes; the guard turns them into misses (`wrong_reads` stays 0). `gets_skipped` "
    "counts gets answered as misses without a host call (pages never put, including the refused ones).")


def live_keying(tree: Path, *, reads: int = 3000, seed: int = 1) -> list[dict[str, Any]]:
    """The same seeded reads through live mounts of ``tree`` with v1, v0+xxh64 and v0+ino."""
    from tmemcore import abi

    from .live import live_run, plan_reads

    plan = plan_reads(tree, reads, seed=seed)
    rows = []
    for abi_name, fold in (("v1", "xxh64"), ("v0", "xxh64"), ("v0", "ino")):
        run = live_run(tree, plan, page_cache_pages=8, tmem_pages=8192, abi=abi_name, fold=fold, seed=seed)
        stats = run["stats"]
        host = stats.get("host") or {}
        rows.append({
            "abi": abi_name,
            "fold": fold if abi_name == "v0" else "-",
            "mode": stats.get("mode", ""),
            "reads": run["reads"],
            "wrong_reads": run["wrong_reads"],
            "succ_gets": stats.get("succ_gets", 0),
            "failed_gets": stats.get("failed_gets", 0),
            "gets_skipped": stats.get("gets_skipped", 0),
            "fold_collisions": stats.get("fold_collisions", 0),
            "oid_collisions": stats.get("oid_collisions", 0),
            # each refused put would have stored a page under an object id owned by another file
            "guard_refused_puts": stats.get("fold_collisions", 0) + stats.get("oid_collisions", 0),
            "record_bytes": abi.RECORD_SIZE[abi.SPEC_V1 if abi_name == "v1" else abi.SPEC_V0],
            "tmem_hit_ratio": stats.get("succ_gets", 0) / run["reads"] if run["reads"] else 0.0,
            "host_pages": int(host.get("global", {}).get("global_pgp_count", 0)),
            "host_objects": int(host.get("global", {}).get("global_obj_count", 0)),
        })
    return rows
