"""The seed of the project: btrfs subvolumes give different files the same inode number.

v1 keys carry the subvolume root id (in the btrfs handle), so they differ; a v0 guest that
folds by inode number collides, and the ownership guard must keep it from serving the other
subvolume's bytes. Checked on keys, through the real cache stack, and through a real FUSE mount.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from guestfs.cleancache import CleanCache
from guestfs.filekey import FileKey, key_for_path
from guestfs.lab.btrfs import BtrfsImage, btrfs_subvolume_image, btrfs_unavailable_reason, file_bytes
from guestfs.pageio import PageIO, wait_until_cacheable
from guestfs.transport import InProcessTransport, MockTransport, Transport

pytestmark = [pytest.mark.btrfs, pytest.mark.timeout(180)]

MODES = [("v1", "xxh64"), ("v0", "xxh64"), ("v0", "ino")]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BtrfsImage]:
    reason = btrfs_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with btrfs_subvolume_image(tmp_path_factory.mktemp("btrfs")) as img:
        wait_until_cacheable(img.mountpoint)  # just written: reads cache once the files settle
        yield img


def test_same_inode_numbers_different_v1_oids_ino_fold_collides(image: BtrfsImage) -> None:
    for a, b in zip(image.files["a"], image.files["b"]):
        ka, kb = key_for_path(str(a)), key_for_path(str(b))
        assert a.stat().st_ino == b.stat().st_ino
        assert ka.source == kb.source == "handle" and ka.handle_type == kb.handle_type == 0x4D
        assert len(ka.handle) == 20  # objectid u64, root id u64, generation u32
        assert ka.oid != kb.oid  # the root id is in the handle words
        folder = CleanCache(MockTransport(spec_versions=(0,)), abi="v0", fold="ino")
        folder.init_fs()
        assert folder.wire_oid(ka) == folder.wire_oid(kb)  # the v0-era key collides
        hasher = CleanCache(MockTransport(spec_versions=(0,)), abi="v0", fold="xxh64")
        hasher.init_fs()
        assert hasher.wire_oid(ka) != hasher.wire_oid(kb)


def host_transport(kind: str, abi: str) -> Transport:
    if kind == "mock":
        return MockTransport(spec_versions=(0, 1))
    import tmemcore

    if not hasattr(tmemcore, "Tmem"):
        pytest.skip("tmemcore.Tmem has not landed yet")
    return InProcessTransport(tmemcore.Tmem(memory_pages=256, accept_v0=abi == "v0"))


def interleaved_reads(pio: PageIO, image: BtrfsImage, rounds: int = 4) -> int:
    """Read every page of both subvolumes' files alternately; return how many reads were wrong."""
    wrong = 0
    fds = {sub: [os.open(p, os.O_RDONLY) for p in image.files[sub]] for sub in ("a", "b")}
    keys = {sub: [key_for_path(str(p)) for p in image.files[sub]] for sub in ("a", "b")}
    try:
        for _ in range(rounds):
            for n in range(len(image.files["a"])):
                for sub in ("a", "b"):
                    expected = file_bytes(sub, n)
                    for offset in range(0, len(expected), 4096):
                        got = pio.read(keys[sub][n], fds[sub][n], offset, 4096)
                        wrong += got != expected[offset : offset + 4096]
            pio.check()
    finally:
        for fd in (fd for fds_ in fds.values() for fd in fds_):
            os.close(fd)
    return wrong


@pytest.mark.parametrize("host", ["real", "mock"])
@pytest.mark.parametrize(("abi", "fold"), MODES)
def test_through_the_stack_no_wrong_reads(image: BtrfsImage, host: str, abi: str, fold: str) -> None:
    cc = CleanCache(host_transport(host, abi), abi=abi, fold=fold)
    cc.init_fs()
    assert cc.mode == (abi if abi == "v1" else f"v0-{fold}")
    pio = PageIO(2, cc)  # tiny first-chance cache: re-reads come back through tmem
    try:
        assert interleaved_reads(pio, image) == 0
        s = pio.stats()
        assert s["succ_gets"] > 0
        if (abi, fold) == ("v0", "ino"):
            assert s["fold_collisions"] > 0  # the guard saw the shared inode numbers and bypassed
        else:
            assert s["fold_collisions"] == 0 and s["oid_collisions"] == 0
    finally:
        pio.close()


def test_guard_off_would_serve_the_other_subvolume(image: BtrfsImage) -> None:
    """Sanity of the proof: with ino folding, both files really travel under one oid."""
    a, b = (key_for_path(str(image.files[s][0])) for s in ("a", "b"))
    host = MockTransport(spec_versions=(0,))
    cc = CleanCache(host, abi="v0", fold="ino")
    cc.init_fs()
    cc.put_page(a, 0, file_bytes("a", 0)[:4096])
    cc.put_page(b, 0, file_bytes("b", 0)[:4096])  # refused by the guard
    assert list(host.pools[0]) == [(cc.wire_oid(b), 0)]  # the single slot b would have hit
    assert cc.get_page(b, 0) is None
    assert isinstance(a, FileKey) and cc.stats()["fold_collisions"] == 1


@pytest.mark.mount
@pytest.mark.parametrize(("abi", "fold"), MODES)
def test_through_a_real_fuse_mount(image: BtrfsImage, tmp_path: Path, abi: str, fold: str) -> None:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing")
    mount = pytest.importorskip("guestfs.mount")
    import tmemcore

    if not hasattr(mount, "start_mount") or not hasattr(tmemcore, "Tmem"):
        pytest.skip("guestfs.mount.start_mount or tmemcore.Tmem has not landed yet")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    args = ["--first-chance", "daemon", "--page-cache", "8K", "--abi", abi, "--v0-fold", fold]
    handle = mount.start_mount(str(image.mountpoint), str(mountpoint), args, timeout=20.0)
    try:
        wrong = 0
        for _ in range(3):
            for n in range(len(image.files["a"])):
                for sub in ("a", "b"):
                    expected = file_bytes(sub, n)
                    with open(mountpoint / sub / image.files[sub][n].name, "rb", buffering=0) as f:
                        for offset in range(0, len(expected), 4096):
                            wrong += os.pread(f.fileno(), 4096, offset) != expected[offset : offset + 4096]
        stats = json.loads(
            subprocess.run(
                [sys.executable, "-m", "guestfs", "stats", str(mountpoint), "--json"],
                capture_output=True, text=True, timeout=30, check=True,
            ).stdout
        )
    finally:
        handle.unmount()
    assert wrong == 0
    assert stats["mode"] == (abi if abi == "v1" else f"v0-{fold}")
    assert stats["succ_gets"] > 0  # re-reads really came back from tmem
    if (abi, fold) == ("v0", "ino"):
        assert stats["fold_collisions"] > 0
    else:
        assert stats["fold_collisions"] == 0 and stats["oid_collisions"] == 0
