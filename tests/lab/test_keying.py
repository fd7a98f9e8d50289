"""Keying study on real trees: collisions per fold, inode reuse, table formatting."""

from __future__ import annotations

from pathlib import Path

from guestfs.filekey import FileKey
from guestfs.lab.keying import collisions, fold_oid, format_table, inode_reuse, keying_table, measure_inode_reuse


def test_tree_has_no_v1_collisions_and_counts_files(tmp_path: Path) -> None:
    for n in range(20):
        (tmp_path / f"f{n}").write_bytes(bytes(n))
    (tmp_path / "link").symlink_to(tmp_path / "f1")
    (rows,) = keying_table([tmp_path])
    assert rows["files"] == 20  # the symlink is not a second file
    assert rows["v1_collisions"] == 0 and rows["v0_xxh64_collisions"] == 0
    assert sum(rows["sources"].values()) == 20
    text = format_table([rows])
    assert str(tmp_path) in text and "v1 coll." in text


def test_ino_fold_collides_where_v1_does_not() -> None:
    a = FileKey(oid=0x1_0000_0005, source="synthetic", handle_type=1, handle=b"a", dev=1, ino=5)
    b = FileKey(oid=0x2_0000_0005, source="synthetic", handle_type=1, handle=b"b", dev=2, ino=5)
    assert collisions({a: a.oid, b: b.oid}) == 0
    assert collisions({a: fold_oid(a, "ino"), b: fold_oid(b, "ino")}) == 1
    assert fold_oid(a, "xxh64") != fold_oid(b, "xxh64")


def test_fold_matches_the_cleancache_frontend() -> None:
    from guestfs.cleancache import CleanCache
    from guestfs.lab.simulate import tmem_class
    from guestfs.transport import InProcessTransport

    key = FileKey(oid=12345, source="synthetic", handle_type=1, handle=b"h", dev=3, ino=77)
    for fold in ("xxh64", "ino"):
        frontend = CleanCache(InProcessTransport(tmem_class()(memory_pages=8, accept_v0=True)), abi="v0", fold=fold)
        frontend.init_fs()
        assert frontend.mode == f"v0-{fold}"
        assert frontend.wire_oid(key) == fold_oid(key, fold)


def test_inode_reuse_changes_handles(tmp_path: Path) -> None:
    result = inode_reuse(tmp_path, attempts=16)
    assert result["attempts"] == 16
    # ext4/xfs/tmpfs hand the freed inode number out again; a new generation changes the handle.
    assert result["v1_oid_reused"] == 0
    for example in result["examples"]:
        assert example["same_ino_fold"] and not example["same_v1_oid"]
    assert not list(tmp_path.iterdir())  # the scratch dir is gone


def test_inode_reuse_falls_back_to_the_temp_dir_where_no_file_can_be_made() -> None:
    # `guestfs lab keying --tree /proc` ended with "/proc/.guestfs-keying-...: No such file or directory"
    result = measure_inode_reuse(Path("/proc"))
    assert result["not_measured_under"] == "/proc" and result["reason"]
    assert result["scratch_parent"] != "/proc" and result["attempts"] == 64
