"""Passthrough equivalence: the mount shows exactly the backing tree, and changes land in it."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.mount.conftest import FIRST_CHANCES

pytestmark = [pytest.mark.mount, pytest.mark.timeout(90, method="thread")]

BINDINGS = ["mfusepy", "fusepy"]
MountFactory = Callable[..., Any]

# fields a passthrough must reproduce exactly (atime is excluded: reading through the mount moves it)
STAT_FIELDS = ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size", "st_mtime_ns", "st_ctime_ns")


def build_tree(root: Path) -> None:
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "empty").write_bytes(b"")
    (root / "small.txt").write_text("small\n")
    (root / "a" / "page.bin").write_bytes(os.urandom(4096))
    (root / "a" / "b" / "odd.bin").write_bytes(os.urandom(3 * 4096 + 123))
    (root / "a" / "b" / "c" / "big.bin").write_bytes(os.urandom(1 << 20))
    (root / "name with spaces & ü").write_text("unicode\n")
    os.symlink("a/page.bin", root / "rel-link")
    os.symlink("/nonexistent/target", root / "dangling")
    os.link(root / "small.txt", root / "a" / "hardlink.txt")
    os.mkfifo(root / "fifo")
    os.setxattr(root / "small.txt", "user.note", b"hello")
    os.chmod(root / "a" / "page.bin", 0o600)
    os.utime(root / "empty", ns=(1_234_567_890_123_456_789, 1_111_111_111_222_333_444))


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry: stat fields, contents or link target, and user xattrs."""
    entries: dict[str, tuple[Any, ...]] = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(directory) / name
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                content: object = path.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            else:
                content = None
            xattrs = {} if stat.S_ISLNK(st.st_mode) or stat.S_ISFIFO(st.st_mode) else {
                key: os.getxattr(path, key) for key in os.listxattr(path) if key.startswith("user.")}
            entries[str(path.relative_to(root))] = (tuple(getattr(st, f) for f in STAT_FIELDS), content, xattrs)
    return entries


@pytest.mark.parametrize("first_chance", FIRST_CHANCES)
@pytest.mark.parametrize("binding", BINDINGS)
def test_mount_shows_the_backing_tree_exactly(mount_factory: MountFactory, tmp_path: Path, binding: str,
                                              first_chance: str) -> None:
    source = tmp_path / "tree"
    source.mkdir()
    build_tree(source)
    m = mount_factory(binding=binding, first_chance=first_chance, source=source)
    expected = snapshot(source)  # after the mount: reading contents moved no ctime/mtime
    seen = snapshot(m.mnt)
    assert seen.keys() == expected.keys()
    for name in expected:
        assert seen[name] == expected[name], name
    assert sorted(os.listdir(m.mnt)) == sorted(os.listdir(source))
    assert snapshot(m.mnt) == expected  # a second pass (kernel mode: the kernel's cached pages) is the same


@pytest.mark.parametrize("first_chance", FIRST_CHANCES)
@pytest.mark.parametrize("binding", BINDINGS)
def test_changes_through_the_mount_land_in_the_backing_tree(mount_factory: MountFactory, binding: str,
                                                            first_chance: str) -> None:
    m = mount_factory(binding=binding, first_chance=first_chance)
    build_tree(m.mnt)  # the whole tree, built through FUSE: mkdir, create, symlink, link, mkfifo, xattr, utime
    reference = m.source.parent / "reference"
    reference.mkdir()
    build_tree(reference)
    ours = {name: (value[0][0], value[0][2], value[0][5], value[2]) for name, value in snapshot(m.source).items()}
    theirs = {name: (value[0][0], value[0][2], value[0][5], value[2]) for name, value in snapshot(reference).items()}
    assert ours == theirs  # mode, nlink, size, xattrs
    assert os.lstat(m.source / "empty").st_mtime_ns == 1_111_111_111_222_333_444

    os.rename(m.mnt / "a" / "b", m.mnt / "moved")
    os.truncate(m.mnt / "moved" / "odd.bin", 10)
    os.unlink(m.mnt / "small.txt")
    os.removexattr(m.mnt / "a" / "hardlink.txt", "user.note")
    os.chmod(m.mnt / "moved", 0o700)
    os.unlink(m.mnt / "moved" / "c" / "big.bin")
    os.rmdir(m.mnt / "moved" / "c")
    assert not (m.source / "moved" / "c").exists()
    assert sorted(os.listdir(m.source)) == sorted(os.listdir(m.mnt))
    assert os.path.getsize(m.source / "moved" / "odd.bin") == 10
    assert os.listxattr(m.source / "a" / "hardlink.txt") == []
    assert stat.S_IMODE(os.stat(m.source / "moved").st_mode) == 0o700
    assert os.stat(m.source / "a" / "hardlink.txt").st_nlink == 1
    assert snapshot(m.mnt).keys() == snapshot(m.source).keys()
    for name in ("moved/odd.bin", "a/page.bin", "a/hardlink.txt"):  # contents, as the mount reads them
        assert (m.mnt / name).read_bytes() == (m.source / name).read_bytes(), name


def test_touch_sets_now_not_1970(mount_factory: MountFactory) -> None:
    """libfuse3 passes UTIME_NOW as a sentinel; a naive passthrough would set 1970-01-01."""
    import subprocess
    import time

    m = mount_factory()
    (m.mnt / "f").write_bytes(b"x")
    os.utime(m.source / "f", ns=(10**9, 10**9))
    subprocess.run(["touch", str(m.mnt / "f")], check=True, timeout=30)
    assert os.stat(m.source / "f").st_mtime_ns > time.time_ns() - 60 * 10**9
    subprocess.run(["touch", "-a", "-d", "@1000000000", str(m.mnt / "f")], check=True, timeout=30)
    st = os.stat(m.source / "f")
    assert st.st_atime_ns == 10**18 and st.st_mtime_ns > 10**18  # atime set, mtime untouched (UTIME_OMIT)
