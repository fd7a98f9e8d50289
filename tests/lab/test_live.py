"""Workloads through a real FUSE mount (marked ``mount``; skipped without /dev/fuse)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from guestfs.lab.live import make_text_tree, plan_reads

pytestmark = pytest.mark.timeout(120)


def fuse_unavailable() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None and shutil.which("fusermount") is None:
        return "fusermount is not installed"
    return None


def test_plan_is_seeded_and_covers_the_tree(tmp_path: Path) -> None:
    tree = make_text_tree(tmp_path / "src", 12, seed=3)
    a = plan_reads(tree, 500, seed=3)
    b = plan_reads(tree, 500, seed=3)
    assert a == b
    assert len(a.files) == 12 and len(a.reads) == 500
    assert all(index * 4096 < max(a.sizes[f], 1) for f, index in a.reads)


@pytest.mark.mount
def test_small_live_workload_reads_right_bytes_and_uses_tmem(tmp_path: Path) -> None:
    reason = fuse_unavailable()
    if reason:
        pytest.skip(reason)
    from guestfs.lab.live import run_small_live_workload

    tree = make_text_tree(tmp_path / "src", 30, seed=2)
    run = run_small_live_workload(tree, reads=1500, page_cache_pages=16, tmem_pages=4096)
    assert run["wrong_reads"] == 0
    stats = run["stats"]
    assert stats["succ_gets"] > 0 and stats["puts"] > 0
    assert stats["backing_bytes_read"] > 0


@pytest.mark.mount
def test_live_keying_modes_on_a_plain_tree(tmp_path: Path) -> None:
    """v1, v0+xxh64 and v0+ino through real mounts: right modes, right record sizes, no wrong bytes."""
    reason = fuse_unavailable()
    if reason:
        pytest.skip(reason)
    from guestfs.lab.keying import live_keying

    tree = make_text_tree(tmp_path / "src", 20, seed=5)
    rows = live_keying(tree, reads=800, seed=5)
    assert [(r["mode"], r["record_bytes"]) for r in rows] == [("v1", 56), ("v0-xxh64", 40), ("v0-ino", 40)]
    assert all(r["wrong_reads"] == 0 for r in rows)
    assert all(r["succ_gets"] > 0 for r in rows)
    assert rows[0]["fold_collisions"] == 0 and rows[1]["fold_collisions"] == 0  # one ext4/tmpfs: unique inodes


@pytest.mark.mount
@pytest.mark.btrfs
def test_live_keying_on_btrfs_subvolumes_counts_ino_collisions(tmp_path: Path) -> None:
    """Same inode numbers in two subvolumes: v0+ino collides (guard counts, no wrong bytes), v1 does not."""
    reason = fuse_unavailable()
    if reason:
        pytest.skip(reason)
    btrfs = pytest.importorskip("guestfs.lab.btrfs")
    why = btrfs.btrfs_unavailable_reason()
    if why:
        pytest.skip(why)
    from guestfs.lab.keying import keying_table, live_keying

    with btrfs.btrfs_subvolume_image(tmp_path) as image:
        (row,) = keying_table([image.mountpoint])
        assert row["v1_collisions"] == 0 and row["v0_ino_collisions"] > 0
        rows = {r["mode"]: r for r in live_keying(image.mountpoint, reads=1500, seed=2)}
    assert all(r["wrong_reads"] == 0 for r in rows.values())
    assert rows["v1"]["fold_collisions"] == 0
    assert rows["v0-ino"]["fold_collisions"] > 0
    assert rows["v0-ino"]["succ_gets"] < rows["v1"]["succ_gets"]  # the guard bypasses the colliding files


@pytest.mark.mount
@pytest.mark.parametrize("workload", ["builtin", "fio"])
def test_live_command_writes_a_sweep(tmp_path: Path, workload: str) -> None:
    reason = fuse_unavailable()
    if reason:
        pytest.skip(reason)
    if workload == "fio" and shutil.which("fio") is None:
        pytest.skip("fio is not installed")
    import json

    from guestfs.lab.cli import main

    out = tmp_path / "out"
    code = main(["--quiet", "live", "--tmem-sizes", "0,512", "--reads", "400", "--files", "12", "--page-cache", "8",
                 "--workload", workload, "--out", str(out)])
    assert code == 0
    runs = json.loads((out / "live.json").read_text())["runs"]
    assert [r["tmem_pages"] for r in runs] == [0, 512]
    assert all(r["wrong_reads"] == 0 and r["reads"] == 400 for r in runs)
    assert runs[1]["stats"]["succ_gets"] > runs[0]["stats"]["succ_gets"]
    assert (out / "summary.md").is_file() and (out / "live.csv").is_file()
