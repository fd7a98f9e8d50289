"""Workloads through a real FUSE mount (marked ``mount``; skipped without /dev/fuse)."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

from guestfs.lab import live
from guestfs.lab.live import FIO_FILE, FioError, fio_unavailable_reason, make_fio_tree, make_text_tree, plan_reads

pytestmark = pytest.mark.timeout(120)


def fuse_unavailable() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None and shutil.which("fusermount") is None:
        return "fusermount is not installed"
    return None


def log_files() -> set[Path]:
    from guestfs.mount import default_log_path

    return set(Path(default_log_path("/x")).parent.glob("*guestfs-lab-mnt*.log"))


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
    logs = log_files()
    run = run_small_live_workload(tree, reads=1500, page_cache_pages=16, tmem_pages=4096)
    assert run["wrong_reads"] == 0
    assert log_files() == logs  # a clean run's daemon log is removed (one was left per run, for good)
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
    assert all(r["guard_refused_puts"] == r["fold_collisions"] + r["oid_collisions"] == 0 for r in rows)


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
    assert rows["v0-ino"]["guard_refused_puts"] == rows["v0-ino"]["fold_collisions"]
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
    assert all(r["workload"] == workload and r["reads"] == 400 for r in runs)
    # fio checks no bytes: its rows say so (None, "n/a") instead of claiming 0 wrong reads
    assert all(r["wrong_reads"] == (None if workload == "fio" else 0) for r in runs)
    assert runs[1]["stats"]["succ_gets"] > runs[0]["stats"]["succ_gets"]
    assert (out / "summary.md").is_file() and (out / "live.csv").is_file()
    assert ("n/a (fio)" in (out / "summary.md").read_text()) == (workload == "fio")


def snapshot(tree: Path) -> dict[str, tuple[int, int]]:
    """Every entry under ``tree`` with its size and mtime: equal snapshots = nothing written."""
    return {str(p.relative_to(tree)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(tree.rglob("*"))}


def test_fio_tree_is_built_beside_the_source_not_in_it(tmp_path: Path) -> None:
    source = make_text_tree(tmp_path / "src", 4, seed=1)
    before = snapshot(source)
    fio_tree = make_fio_tree(source, tmp_path / "fio", max_bytes=10_000)
    assert snapshot(source) == before
    assert [p.name for p in fio_tree.iterdir()] == [FIO_FILE]
    whole = b"".join(p.read_bytes() for p in sorted(source.rglob("*")) if p.is_file())
    assert (fio_tree / FIO_FILE).read_bytes() == whole[:10_000]


def test_fio_needs_one_block_of_data(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "hosts").write_text("127.0.0.1 localhost\n")
    reason = fio_unavailable_reason(make_fio_tree(source, tmp_path / "fio"))
    assert reason is not None and ("4 KiB" in reason or "not installed" in reason)


def test_a_failing_fio_sweep_is_redone_by_the_builtin_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fio failing in any run: every row comes from the built-in reader, and the reason is kept."""
    import argparse

    calls: list[str | None] = []

    def fake_sweep(args: object, tree: Path, plan: object, sizes: list[int], fio_file: str | None) -> list[dict]:
        calls.append(fio_file)
        if fio_file is not None:
            raise FioError("fio failed: boom")
        return [{"workload": "builtin", "tmem_pages": size} for size in sizes]

    monkeypatch.setattr(live, "_sweep", fake_sweep)
    monkeypatch.setattr(live, "fio_unavailable_reason", lambda tree: None)
    source = make_text_tree(tmp_path / "src", 3, seed=1)
    args = argparse.Namespace(workload="auto")
    runs, reason = live.run_sweep(args, source, plan_reads(source, 10), [0, 8], tmp_path / "scratch")
    assert calls == [FIO_FILE, None]
    assert [r["workload"] for r in runs] == ["builtin", "builtin"] and reason == "fio failed: boom"


@pytest.mark.mount
@pytest.mark.parametrize("workload", ["auto", "fio", "builtin"])
def test_live_never_writes_into_the_users_source(tmp_path: Path, workload: str) -> None:
    """The audit's repro: a one-file --source must come back untouched, and fio's failure is a fallback."""
    reason = fuse_unavailable()
    if reason:
        pytest.skip(reason)
    import json

    from guestfs.lab.cli import main

    source = tmp_path / "x"
    source.mkdir()
    (source / "hosts").write_text("127.0.0.1 localhost\n")
    before = snapshot(source)
    out = tmp_path / "out"
    assert main(["--quiet", "live", "--source", str(source), "--tmem-sizes", "0", "--reads", "100",
                 "--workload", workload, "--out", str(out)]) == 0
    assert snapshot(source) == before
    data = json.loads((out / "live.json").read_text())
    assert data["workload"] == "builtin" and data["runs"][0]["wrong_reads"] == 0
    if workload == "builtin":
        assert data["fio_fallback_reason"] is None
    else:
        assert data["fio_fallback_reason"]
        assert "fio could not run" in (out / "summary.md").read_text()


@pytest.mark.mount
def test_live_fio_over_a_user_source_leaves_it_untouched(tmp_path: Path) -> None:
    reason = fuse_unavailable()
    if reason:
        pytest.skip(reason)
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed")
    import json

    from guestfs.lab.cli import main

    source = make_text_tree(tmp_path / "src", 6, seed=4)
    before = snapshot(source)
    out = tmp_path / "out"
    assert main(["--quiet", "live", "--source", str(source), "--tmem-sizes", "64", "--reads", "200",
                 "--page-cache", "4", "--workload", "fio", "--out", str(out)]) == 0
    assert snapshot(source) == before
    (run,) = json.loads((out / "live.json").read_text())["runs"]
    assert run["workload"] == "fio" and run["wrong_reads"] is None and run["stats"]["succ_gets"] > 0


@pytest.mark.mount
def test_keying_live_command_writes_plots_and_guard_column(tmp_path: Path) -> None:
    reason = fuse_unavailable()
    if reason:
        pytest.skip(reason)
    import json

    from guestfs.lab.cli import main

    tree = make_text_tree(tmp_path / "src", 8, seed=6)
    out = tmp_path / "out"
    assert main(["--quiet", "keying", "--tree", str(tree), "--live", "--out", str(out)]) == 0
    data = json.loads((out / "keying.json").read_text())
    assert [r["mode"] for r in data["live"]] == ["v1", "v0-xxh64", "v0-ino"]
    summary = (out / "summary.md").read_text()
    assert "guard_refused_puts" in summary and "collision guard" in summary
    assert (out / "keying-live.csv").read_text().splitlines()[0].count("guard_refused_puts") == 1
    # the second save-stream estimate uses the v1 live run's pages and objects
    live_sizes = data["sizes_from_live"]
    assert live_sizes["stream_pages"] == data["live"][0]["host_pages"] > 0
    assert live_sizes["stream_objects"] == data["live"][0]["host_objects"] > 0
    assert "v1 live run" in summary
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "keying.png").is_file() and (out / "keying-live.png").is_file()
