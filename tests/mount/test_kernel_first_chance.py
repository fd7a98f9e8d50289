"""--first-chance kernel through real FUSE mounts: the kernel's page cache is the first chance, tmem an
inclusive second chance behind it, and opens are close-to-open coherent with the backing files.

What the daemon's counters can show here: a read the kernel served never reaches the daemon (``reads``
does not move); pages the kernel dropped (``POSIX_FADV_DONTNEED`` on a descriptor of the mount) come back
from tmem (``succ_gets``) without touching the backing store (``backing_bytes_read``).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from guestfs.pageio import wait_until_cacheable
from tests.mount.conftest import FIRST_CHANCES

pytestmark = [pytest.mark.mount, pytest.mark.timeout(90, method="thread")]

MountFactory = Callable[..., Any]
BINDINGS = ["mfusepy", "fusepy"]
PAGE = 4096
# Before multigrain timestamps (Linux 6.13) a same-size rewrite within one timestamp tick is invisible to
# size/mtime/ctime validation (the documented caveat): there the external writer also moves mtime.
COARSE_TIMESTAMPS = tuple(int(part) for part in os.uname().release.split(".")[:2]) < (6, 13)


def counters(m: Any, *names: str) -> dict[str, int]:
    stats = m.stats()
    return {name: stats[name] for name in names}


def drop_kernel_pages(fd: int) -> None:
    """Make the kernel drop its clean cached pages of the file behind ``fd`` (a descriptor of the mount)."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def read_all(path: Path, flags: int = os.O_RDONLY, *, drop_first: bool = False) -> bytes:
    fd = os.open(path, flags)
    try:
        if drop_first:
            drop_kernel_pages(fd)
        parts = []
        while chunk := os.pread(fd, 1 << 20, sum(map(len, parts))):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


def settled_file(m: Any, name: str, data: bytes) -> Path:
    """``data`` written behind the mount, and settled: reads through the mount may cache it."""
    (m.source / name).write_bytes(data)
    wait_until_cacheable(m.source / name)
    return m.mnt / name


# -- the kernel serves repeated reads; tmem is inclusive and its gets non-exclusive ----------------------


@pytest.mark.parametrize("binding", BINDINGS)
def test_repeated_reads_are_served_by_the_kernel(mount_factory: MountFactory, binding: str) -> None:
    m = mount_factory(binding=binding, first_chance="kernel")
    data = os.urandom(32 * PAGE + 123)
    path = settled_file(m, "f", data)
    assert path.read_bytes() == data
    first = counters(m, "reads", "puts", "backing_bytes_read", "succ_gets", "page_cache_hits", "tracked_pages")
    assert first["reads"] > 0 and first["backing_bytes_read"] == len(data)
    assert first["puts"] == first["tracked_pages"] == 33, first  # inclusive: every page read is put at once
    assert first["page_cache_hits"] == 0  # guestfs holds no first-chance pages of its own
    for _ in range(2):  # a reopen of the unchanged file keeps the kernel's pages (FOPEN_KEEP_CACHE)
        assert path.read_bytes() == data
    assert counters(m, *first) == first  # not one request reached the daemon


@pytest.mark.parametrize("binding", BINDINGS)
def test_pages_the_kernel_dropped_come_back_from_tmem_and_stay_there(mount_factory: MountFactory,
                                                                     binding: str) -> None:
    m = mount_factory(binding=binding, first_chance="kernel")
    data = os.urandom(20 * PAGE + 5)
    path = settled_file(m, "f", data)
    assert path.read_bytes() == data  # from the backing file, every page put into tmem
    before = counters(m, "succ_gets", "failed_gets", "backing_bytes_read", "tracked_pages")
    assert before["tracked_pages"] == 21
    fd = os.open(path, os.O_RDONLY)
    try:
        for round_number in (1, 2):  # the second drop hits again: a hit leaves the page in tmem
            drop_kernel_pages(fd)
            assert os.pread(fd, len(data) + PAGE, 0) == data
            now = counters(m, *before)
            assert now["succ_gets"] == before["succ_gets"] + 21 * round_number, now
            assert now["failed_gets"] == before["failed_gets"], now
            assert now["backing_bytes_read"] == before["backing_bytes_read"], now
            assert now["tracked_pages"] == 21, now
    finally:
        os.close(fd)


# -- coherence with changes behind the mount and through it ----------------------------------------------


def rewrite_behind(path: Path, new: bytes) -> None:
    """Another process rewrites the backing file in place (same inode) and closes it."""
    with open(path, "r+b") as handle:
        handle.write(new)
        handle.truncate(len(new))
        if COARSE_TIMESTAMPS:
            os.utime(handle.fileno(), ns=(0, os.fstat(handle.fileno()).st_mtime_ns + 1))


@pytest.mark.parametrize("first_chance", FIRST_CHANCES)
@pytest.mark.parametrize("new_size", [13 * PAGE + 77, 21 * PAGE + 5, 4 * PAGE + 1], ids=["same", "grow", "shrink"])
def test_an_external_change_is_seen_at_the_next_open_never_the_old_bytes(
        mount_factory: MountFactory, first_chance: str, new_size: int) -> None:
    # daemon mode: a 2-page first-chance cache, so most of the old pages sit in tmem (as in kernel mode)
    m = mount_factory(*(["--page-cache", "8K"] if first_chance == "daemon" else []), first_chance=first_chance)
    old = os.urandom(13 * PAGE + 77)
    path = settled_file(m, "f", old)
    for _ in range(2):
        assert read_all(path, drop_first=True) == old
    assert m.stats()["tracked_pages"] > 0  # tmem holds old pages of the file
    new = os.urandom(new_size)  # random: no byte range of it is likely to equal the old one's

    rewrite_behind(m.source / "f", new)
    assert read_all(path) == new  # a read-only reopen, within the settle time (kernel mode: direct_io)
    assert read_all(path, drop_first=True) == new  # nothing old left in tmem either
    # A writable reopen within the attribute timeout may stop at the kernel's old size (documented for
    # --first-chance kernel), but what it returns is the new file's bytes, never the old ones.
    got = read_all(path, os.O_RDWR)
    assert got == new[:len(got)] and len(got) >= min(len(old), len(new)), (len(got), len(old), len(new))
    if first_chance == "daemon" or len(new) <= len(old):
        assert got == new

    wait_until_cacheable(m.source / "f")  # settled: the opens are cached again
    for drop_first in (False, False, True):
        assert read_all(path, drop_first=drop_first) == new
    assert read_all(path, os.O_RDWR) == new
    assert m.stats()["revalidate_drops"] > 0


def test_a_just_changed_file_opened_read_only_is_direct_until_it_settles(mount_factory: MountFactory) -> None:
    """Within max(1 s, attr timeout) of a change behind the mount a read-only open is direct_io (every
    read reaches the daemon), a writable one is cached; once settled, read-only opens are cached too."""
    m = mount_factory(first_chance="kernel")

    def reads_of_two_preads(flags: int) -> list[int]:
        fd = os.open(m.mnt / "f", flags)
        try:
            deltas = []
            for _ in range(2):
                before = m.stats()["reads"]
                assert os.pread(fd, PAGE, 2 * PAGE) == (m.source / "f").read_bytes()[2 * PAGE:3 * PAGE]
                deltas.append(m.stats()["reads"] - before)
            return deltas
        finally:
            os.close(fd)

    for _ in range(3):  # (a machine too loaded to open within the second is given another try)
        (m.source / "f").write_bytes(os.urandom(8 * PAGE))
        written = os.stat(m.source / "f").st_ctime_ns
        just_changed = [reads_of_two_preads(os.O_RDONLY), reads_of_two_preads(os.O_RDWR)]
        if time.time_ns() - written < 900_000_000:
            break
    assert just_changed[0] == [1, 1]  # direct_io: the kernel caches nothing
    assert just_changed[1][1] == 0  # cached (a direct write would bypass other fds' pages)
    wait_until_cacheable(m.source / "f")
    assert reads_of_two_preads(os.O_RDONLY)[1] == 0
    assert reads_of_two_preads(os.O_RDONLY) == [0, 0]  # unchanged since the last open: the kernel keeps it


@pytest.mark.parametrize("binding", BINDINGS)
def test_writes_through_the_mount_are_read_back_and_flush_tmem(mount_factory: MountFactory, binding: str) -> None:
    m = mount_factory(binding=binding, first_chance="kernel")
    data = bytearray(os.urandom(16 * PAGE))
    path = settled_file(m, "f", bytes(data))
    assert path.read_bytes() == data  # every page in tmem now
    before = counters(m, "invalidates", "backing_bytes_read", "succ_gets", "tracked_pages")
    assert before["tracked_pages"] == 16

    fd = os.open(path, os.O_RDWR)
    try:
        assert os.pwrite(fd, b"W" * 100, PAGE + 50) == 100  # part of page 1
        assert os.pwrite(fd, b"V" * PAGE, 3 * PAGE) == PAGE  # all of page 3
        data[PAGE + 50:PAGE + 150] = b"W" * 100
        data[3 * PAGE:4 * PAGE] = b"V" * PAGE
        after_write = counters(m, *before)
        assert after_write["invalidates"] >= before["invalidates"] + 2, after_write
        assert after_write["tracked_pages"] == 14, after_write  # the touched pages' tmem copies were flushed
        # the same descriptor sees its writes (libfuse3's auto_inval_data may send this read to the daemon:
        # it then puts the touched pages again, read back from the backing file)
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)
    assert (m.source / "f").read_bytes() == data

    assert path.read_bytes() == data  # a reopen after our own write
    assert read_all(path, drop_first=True) == data  # and with the kernel's pages gone: tmem has no old copy
    end = counters(m, *before)
    # the untouched 14 pages came from tmem, only the 2 touched ones (at most) from the backing file
    assert end["succ_gets"] >= before["succ_gets"] + 14, end
    assert end["backing_bytes_read"] - before["backing_bytes_read"] <= 2 * PAGE, end


@pytest.mark.parametrize("options", [[], ["--abi", "v0", "--v0-fold", "ino"]], ids=["v1", "v0-ino"])
def test_never_foreign_bytes_across_many_files(mount_factory: MountFactory, options: list[str]) -> None:
    """Files of distinct content, read interleaved page by page, the kernel's pages dropped, re-read in
    another order, with a tmem smaller than the files (evictions): every byte is its own file's."""
    m = mount_factory("--tmem", "256K", *options, first_chance="kernel")
    contents = {f"d{index % 4}/f{index}": os.urandom(6 * PAGE - index) for index in range(48)}
    for name, blob in contents.items():
        (m.source / name).parent.mkdir(exist_ok=True)
        (m.source / name).write_bytes(blob)
    wait_until_cacheable(m.source)
    fds = {name: os.open(m.mnt / name, os.O_RDONLY) for name in contents}
    try:
        for order in (list(contents), list(reversed(contents)), random.Random(7).sample(list(contents), len(contents))):
            for index in range(6):
                for name in order:
                    expected = contents[name][index * PAGE:(index + 1) * PAGE]
                    assert os.pread(fds[name], PAGE, index * PAGE) == expected, (name, index)
            for fd in fds.values():
                drop_kernel_pages(fd)
    finally:
        for fd in fds.values():
            os.close(fd)
    for name, blob in contents.items():  # and whole, through fresh opens
        assert (m.mnt / name).read_bytes() == blob, name
    stats = m.stats()
    assert stats["succ_gets"] > 0 and stats["failed_gets"] > 0, stats  # tmem served some and missed some


# -- guestfs stats -------------------------------------------------------------------------------------


@pytest.mark.parametrize("first_chance", FIRST_CHANCES)
def test_stats_cli_says_kernel_page_cache_hits_are_not_counted(mount_factory: MountFactory,
                                                               first_chance: str) -> None:
    m = mount_factory(first_chance=first_chance)
    (m.mnt / "f").write_bytes(b"x" * 9000)
    assert (m.mnt / "f").read_bytes() == b"x" * 9000
    run = [sys.executable, "-m", "guestfs", "stats", str(m.mnt)]
    text = subprocess.run(run, check=True, capture_output=True, text=True, timeout=30).stdout
    as_json = json.loads(subprocess.run([*run, "--json"], check=True, capture_output=True, text=True,
                                        timeout=30).stdout)
    assert as_json["first_chance"] == first_chance and as_json["exclusive_gets"] == (first_chance == "daemon")
    assert text.startswith(f"keying/ABI: {as_json['mode']}")
    # the phrase docs/guestfs.md promises ("kernel page-cache hits are not counted (guestfs stats says so)")
    assert ("kernel page-cache hits are not counted" in text) == (first_chance == "kernel"), text
    if first_chance == "kernel":
        assert "succ_gets" in text and "first-chance page cache" not in text, text


# -- --backing-direct ----------------------------------------------------------------------------------


def daemon_backing_fds(m: Any, name: str) -> list[int]:
    """The open-file flags of each descriptor the daemon holds on the backing file ``name``."""
    pid = m.handle.process.pid
    target = os.path.realpath(m.source / name)
    flags = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != target:
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                flags.append(int(next(line for line in info if line.startswith("flags:")).split()[1], 8))
        except (FileNotFoundError, StopIteration):
            continue
    return flags


def exercise(m: Any) -> list[int]:
    """Reads of every tier, a write, a grown file: the bytes through the mount are the backing file's.
    Returns the flags of the daemon's descriptors of the file while it was open."""
    data = bytearray(os.urandom(40 * PAGE + 321))
    path = settled_file(m, "f", bytes(data))
    fd = os.open(path, os.O_RDWR)
    try:
        assert os.pread(fd, len(data) + PAGE, 0) == data
        assert os.pread(fd, 5000, 7 * PAGE + 3) == data[7 * PAGE + 3:7 * PAGE + 5003]
        assert os.pwrite(fd, b"N" * 6000, 39 * PAGE) == 6000  # over the partial last page, growing the file
        data[39 * PAGE:] = b"N" * 6000
        drop_kernel_pages(fd)
        assert os.pread(fd, len(data) + PAGE, 0) == data
        flags = daemon_backing_fds(m, "f")
    finally:
        os.close(fd)
    drop = read_all(path, drop_first=True)
    assert drop == data == (m.source / "f").read_bytes()
    assert flags, "the daemon holds no descriptor of the open file"
    return flags


@pytest.mark.parametrize("first_chance", FIRST_CHANCES)
def test_backing_direct_reads_misses_with_o_direct(mount_factory: MountFactory, first_chance: str,
                                                   tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    probe.write_bytes(bytes(PAGE))
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        pytest.skip(f"{tmp_path} refuses O_DIRECT (see the ramfs test for that case)")
    m = mount_factory("--backing-direct", first_chance=first_chance)
    flags = exercise(m)
    assert any(flag & os.O_DIRECT for flag in flags), [oct(flag) for flag in flags]  # the miss reader
    assert any(not flag & os.O_DIRECT for flag in flags)  # and the one writes go through
    stats = m.stats()
    assert stats["backing_direct"] == 1 and stats["backing_bytes_read"] > 0
    assert "refuses O_DIRECT" not in Path(m.handle.log_path).read_text()


@pytest.fixture
def ramfs(tmp_path: Path) -> Any:
    """A ramfs mount: a file system that refuses O_DIRECT opens (EINVAL). Needs root. Request it before
    mount_factory, so the guestfs mount over it is unmounted first."""
    path = tmp_path / "ramfs"
    path.mkdir()
    result = subprocess.run(["mount", "-t", "ramfs", "ramfs", str(path)], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a ramfs: {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@pytest.mark.parametrize("first_chance", FIRST_CHANCES)
def test_backing_direct_on_a_file_system_refusing_o_direct_still_works(ramfs: Path, mount_factory: MountFactory,
                                                                       first_chance: str) -> None:
    (ramfs / "probe").write_bytes(bytes(PAGE))
    with pytest.raises(OSError):
        os.open(ramfs / "probe", os.O_RDONLY | os.O_DIRECT)
    os.unlink(ramfs / "probe")
    m = mount_factory("--backing-direct", first_chance=first_chance, source=ramfs)
    flags = exercise(m)
    assert read_all(m.mnt / "f") == (ramfs / "f").read_bytes()  # more opens: still one notice
    assert not any(flag & os.O_DIRECT for flag in flags)
    assert Path(m.handle.log_path).read_text().count("refuses O_DIRECT") == 1
