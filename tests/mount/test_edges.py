"""Edges where a passthrough can differ from its backing directory (found by comparing a mount with a
twin directory): open unlinked files, O_APPEND through hard links, modes under the caller's umask,
single-timestamp updates, the daemon's import path."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from guestfs.config import mount_type
from tests.polling import wait_for

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120, method="thread")]

BINDINGS = ["mfusepy", "fusepy"]
MountFactory = Callable[..., Any]


@pytest.mark.parametrize("binding", BINDINGS)
def test_an_open_unlinked_file_keeps_working_and_goes_at_its_last_close(
        mount_factory: MountFactory, binding: str) -> None:
    """Why libfuse's hidden names are kept (no hard_remove): fstat asks the daemon by path."""
    m = mount_factory(binding=binding)
    payload = os.urandom(3 * 4096 + 5)
    (m.mnt / "f").write_bytes(payload)
    with open(m.mnt / "f", "rb") as held:
        os.unlink(m.mnt / "f")
        assert "f" not in os.listdir(m.mnt)
        assert held.read() == payload and os.fstat(held.fileno()).st_size == len(payload)
    assert wait_for(lambda: os.listdir(m.source) == [], timeout=15)  # the hidden name goes at the (async) release


@pytest.mark.parametrize("binding", BINDINGS)
def test_append_through_a_second_hard_link_lands_at_the_real_end(mount_factory: MountFactory, binding: str) -> None:
    """The kernel caches a size per name; its append offset for b is stale after a write through a."""
    m = mount_factory(binding=binding)
    (m.mnt / "a").write_bytes(b"1" * 100)
    os.link(m.mnt / "a", m.mnt / "b")
    os.stat(m.mnt / "b")  # the kernel now caches b's size (100)
    with open(m.mnt / "a", "ab") as through_a:
        through_a.write(b"2" * 50)
    with open(m.mnt / "b", "ab") as through_b:
        through_b.write(b"3" * 10)
    expected = b"1" * 100 + b"2" * 50 + b"3" * 10
    assert (m.source / "a").read_bytes() == expected
    assert (m.mnt / "a").read_bytes() == expected and (m.mnt / "b").read_bytes() == expected  # no stale cache


@pytest.mark.parametrize("binding", BINDINGS)
def test_modes_follow_the_callers_umask_only(mount_factory: MountFactory, binding: str) -> None:
    m = mount_factory(binding=binding)
    script = (f"import os; os.umask(0o002); os.close(os.open({str(m.mnt / 'f')!r}, os.O_CREAT | os.O_WRONLY, 0o666)); "
              f"os.mkdir({str(m.mnt / 'd')!r}, 0o775)")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)
    assert oct(os.stat(m.source / "f").st_mode & 0o777) == oct(0o664)
    assert oct(os.stat(m.source / "d").st_mode & 0o777) == oct(0o775)


@pytest.mark.parametrize("binding", BINDINGS)
def test_setting_one_timestamp_keeps_the_other(mount_factory: MountFactory, binding: str) -> None:
    """touch -m / -a: the other time is UTIME_OMIT (libfuse2 dropped such calls unless told otherwise)."""
    m = mount_factory(binding=binding)
    (m.mnt / "f").write_bytes(b"x")
    os.utime(m.source / "f", ns=(1_000_000_000, 2_000_000_000))
    subprocess.run(["touch", "-m", "-d", "2001-02-03 04:05:06 UTC", str(m.mnt / "f")], check=True, timeout=30)
    st = os.stat(m.source / "f")
    assert st.st_mtime_ns == 981_173_106 * 10**9 and st.st_atime_ns == 1_000_000_000


def test_the_daemon_never_imports_guestfs_from_the_callers_directory(mount_factory: MountFactory, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    impostor = tmp_path / "cwd" / "guestfs"
    impostor.mkdir(parents=True)
    marker = tmp_path / "impostor-ran"
    (impostor / "__init__.py").write_text("")
    (impostor / "__main__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.chdir(impostor.parent)
    m = mount_factory()
    assert mount_type(str(m.mnt)) == "fuse.guestfs" and not marker.exists()


def test_fallocate_through_the_mount(mount_factory: MountFactory) -> None:
    """posix_fallocate on a write-only descriptor (glibc's emulation needed a readable one), and a hole
    punched through the mount into a cached file reads back as zeros."""
    import ctypes

    m = mount_factory("--page-cache", "4K", "--tmem", "64K")  # pages of f go through tmem too
    (m.mnt / "f").write_bytes(b"x" * (3 * 4096))
    assert (m.mnt / "f").read_bytes() == b"x" * (3 * 4096)  # now cached (first chance and tmem)
    fd = os.open(m.mnt / "f", os.O_WRONLY)
    try:
        os.posix_fallocate(fd, 0, 5 * 4096)
    finally:
        os.close(fd)
    assert os.stat(m.source / "f").st_size == 5 * 4096
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(m.mnt / "f", os.O_RDWR)
    try:
        punch = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        if libc.fallocate(fd, punch, ctypes.c_int64(4096), ctypes.c_int64(4096)) != 0:
            pytest.skip(f"no hole punching here: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)
    expected = b"x" * 4096 + bytes(4096) + b"x" * 4096 + bytes(2 * 4096)
    assert (m.source / "f").read_bytes() == expected
    assert (m.mnt / "f").read_bytes() == expected  # never the cached x's of the punched page


def test_seek_data_and_hole_reach_the_backing_file(mount_factory: MountFactory) -> None:
    """SEEK_DATA/SEEK_HOLE (libfuse3's lseek): a sparse file's holes show through the mount, as cp needs."""
    m = mount_factory()
    with open(m.source / "sparse", "wb") as f:
        f.seek(1 << 20)
        f.write(b"data")
    fd = os.open(m.source / "sparse", os.O_RDONLY)
    try:
        expected = os.lseek(fd, 0, os.SEEK_DATA)
    finally:
        os.close(fd)
    if expected == 0:
        pytest.skip("the backing file system reports no holes")
    fd = os.open(m.mnt / "sparse", os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == expected and os.lseek(fd, 0, os.SEEK_HOLE) == 0
        assert os.pread(fd, 4, 1 << 20) == b"data"  # positional reads do not care where lseek left it
    finally:
        os.close(fd)
