"""Real FUSE mounts on both bindings: basic I/O, exact read accounting, stats, rename flags."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from guestfs.pageio import wait_until_cacheable
from tests.mount.conftest import FIRST_CHANCES

BINDINGS = ["mfusepy", "fusepy"]
MountFactory = Callable[..., Any]  # the mount_factory fixture from tests/mount/conftest.py

pytestmark = [pytest.mark.mount, pytest.mark.timeout(90, method="thread")]


@pytest.mark.parametrize("first_chance", FIRST_CHANCES)
@pytest.mark.parametrize("binding", BINDINGS)
def test_read_write_roundtrip(mount_factory: MountFactory, binding: str, first_chance: str) -> None:
    m = mount_factory(binding=binding, first_chance=first_chance)
    (m.source / "seed.txt").write_bytes(b"seed data\n")
    assert (m.mnt / "seed.txt").read_bytes() == b"seed data\n"
    (m.mnt / "new.bin").write_bytes(os.urandom(3) + b"x" * 20000)
    assert (m.mnt / "new.bin").read_bytes() == (m.source / "new.bin").read_bytes()
    assert os.stat(m.mnt / "new.bin").st_size == 20003
    stats = m.stats()
    assert stats["mount"]["binding"] == binding  # type: ignore[index]
    assert stats["mount"]["libfuse"] == (3 if binding == "mfusepy" else 2)  # type: ignore[index]
    assert stats["first_chance"] == first_chance and stats["exclusive_gets"] == (first_chance == "daemon")


@pytest.mark.parametrize("binding", BINDINGS)
def test_every_4k_read_reaches_the_daemon(mount_factory: MountFactory, binding: str) -> None:
    """direct_io self-test: N application reads → exactly N PageIO reads (catches fuse_file_info ABI drift).

    --first-chance daemon only (the fixture's default): in kernel mode the kernel's page cache serves
    repeated reads (tests/mount/test_kernel_first_chance.py checks that they do *not* reach the daemon)."""
    m = mount_factory(binding=binding)
    (m.source / "data").write_bytes(os.urandom(64 * 4096))
    before = m.stats()["reads"]
    fd = os.open(m.mnt / "data", os.O_RDONLY)
    try:
        for _ in range(3):
            for index in (5, 1, 9, 5):
                assert len(os.pread(fd, 4096, index * 4096)) == 4096
    finally:
        os.close(fd)
    assert m.stats()["reads"] == before + 12  # type: ignore[operator]


def test_cached_reread_hits_and_external_change_is_seen(mount_factory: MountFactory) -> None:
    """--first-chance daemon only: counts guestfs's own first-chance hits, and sees the change without a
    reopen (kernel mode is close-to-open: tests/mount/test_kernel_first_chance.py)."""
    m = mount_factory("--page-cache", "1M")
    (m.source / "f").write_bytes(b"A" * 8192)
    wait_until_cacheable(m.source / "f")  # written behind the mount: cached once it settles
    assert (m.mnt / "f").read_bytes() == b"A" * 8192
    hits_before = m.stats()["page_cache_hits"]
    assert (m.mnt / "f").read_bytes() == b"A" * 8192
    assert m.stats()["page_cache_hits"] > hits_before  # type: ignore[operator]
    (m.source / "f").write_bytes(b"B" * 8192)  # behind the mount's back, same size
    os.utime(m.source / "f", ns=(1, 10**18))  # and a different mtime, as an external writer leaves
    assert (m.mnt / "f").read_bytes() == b"B" * 8192


def test_stats_cli_prints_json_and_text(mount_factory: MountFactory) -> None:
    m = mount_factory()
    (m.mnt / "f").write_bytes(b"x" * 5000)
    (m.mnt / "f").read_bytes()
    run = [sys.executable, "-m", "guestfs", "stats", str(m.mnt)]
    as_json = json.loads(subprocess.run([*run, "--json"], check=True, capture_output=True, text=True,
                                        timeout=30).stdout)
    for name in ("mode", "succ_gets", "failed_gets", "puts", "invalidates", "page_cache_hits",
                 "page_cache_misses", "backing_bytes_read", "fold_collisions"):
        assert name in as_json, name
    text = subprocess.run(run, check=True, capture_output=True, text=True, timeout=30).stdout
    assert text.startswith(f"keying/ABI: {as_json['mode']}") and "succ_gets" in text and "bytes read" in text


def test_stats_of_a_plain_directory_fails_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "guestfs", "stats", str(tmp_path)], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1


def _renameat2(old: Path, new: Path, flags: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), ctypes.c_uint(flags))
    return 0 if result == 0 else ctypes.get_errno()


def test_rename_noreplace_and_exchange_on_libfuse3(mount_factory: MountFactory) -> None:
    m = mount_factory()
    (m.mnt / "a").write_bytes(b"aaa")
    (m.mnt / "b").write_bytes(b"bbb")
    assert _renameat2(m.mnt / "a", m.mnt / "b", 1) == errno.EEXIST  # RENAME_NOREPLACE
    assert (m.source / "b").read_bytes() == b"bbb"
    assert _renameat2(m.mnt / "a", m.mnt / "b", 2) == 0  # RENAME_EXCHANGE
    assert (m.mnt / "a").read_bytes() == b"bbb" and (m.mnt / "b").read_bytes() == b"aaa"


def test_shared_mmap_fails_private_mmap_works(mount_factory: MountFactory) -> None:
    """The documented cost of direct_io: MAP_SHARED is refused (ENODEV), MAP_PRIVATE works.

    --first-chance daemon only (every open is direct_io); the kernel-mode counterpart is below."""
    import mmap

    m = mount_factory()
    (m.source / "f").write_bytes(b"m" * 4096)
    with open(m.mnt / "f", "r+b") as handle:
        with pytest.raises(OSError) as info:
            mmap.mmap(handle.fileno(), 4096, flags=mmap.MAP_SHARED)
        assert info.value.errno == errno.ENODEV
        with mmap.mmap(handle.fileno(), 4096, flags=mmap.MAP_PRIVATE) as private:
            assert private[:4] == b"mmmm"


@pytest.mark.parametrize("binding", BINDINGS)
def test_shared_mmap_works_in_kernel_mode_and_its_stores_reach_the_backing_file(
        mount_factory: MountFactory, binding: str) -> None:
    """--first-chance kernel opens are cached (no direct_io): MAP_SHARED maps the kernel's pages, and
    its stores go back through the mount (writeback -> the daemon's write) to the backing file."""
    import mmap

    m = mount_factory(binding=binding, first_chance="kernel")
    original = os.urandom(3 * 4096)
    (m.mnt / "f").write_bytes(original)
    with open(m.mnt / "f", "r+b") as handle:
        with mmap.mmap(handle.fileno(), 3 * 4096, flags=mmap.MAP_SHARED) as shared:
            assert shared[:] == original
            shared[4096 + 10:4096 + 20] = b"S" * 10
            shared.flush()  # msync: writeback through the mount, before munmap
    expected = original[:4096 + 10] + b"S" * 10 + original[4096 + 20:]
    assert (m.source / "f").read_bytes() == expected
    assert (m.mnt / "f").read_bytes() == expected
    stats = m.stats()
    assert stats["writes"] >= 2 and stats["bytes_written"] >= len(original) + 10, stats  # type: ignore[operator]


def test_read_only_mount_refuses_writes(mount_factory: MountFactory) -> None:
    m = mount_factory("--ro")
    with pytest.raises(OSError) as info:
        (m.mnt / "f").write_bytes(b"x")
    assert info.value.errno == errno.EROFS and not (m.source / "f").exists()


@pytest.mark.parametrize("threads", ["single", "multi"])
def test_concurrent_readers_and_writers(mount_factory: MountFactory, threads: str) -> None:
    """Four threads hammer the mount (PageIO must be thread-safe under libfuse's multithreaded loop)."""
    from concurrent.futures import ThreadPoolExecutor

    m = mount_factory("--threads", threads, "--page-cache", "64K", "--tmem", "1M")
    blobs = {f"f{index}": os.urandom(200_000 + index) for index in range(4)}
    for name, blob in blobs.items():
        (m.source / name).write_bytes(blob)

    def worker(name: str) -> bool:
        blob = bytearray(blobs[name])
        fd = os.open(m.mnt / name, os.O_RDWR)
        try:
            for round_number in range(40):
                offset = (round_number * 7919) % (len(blob) - 5000)
                patch = os.urandom(3000)
                os.pwrite(fd, patch, offset)
                blob[offset:offset + len(patch)] = patch
                if os.pread(fd, len(blob), 0) != blob:
                    return False
        finally:
            os.close(fd)
        return (m.source / name).read_bytes() == blob

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert all(pool.map(worker, blobs))


def test_unlinked_open_file_stays_readable_and_disappears_after_close(mount_factory: MountFactory) -> None:
    import time

    m = mount_factory()
    (m.mnt / "f").write_bytes(b"keep me" * 1000)
    fd = os.open(m.mnt / "f", os.O_RDONLY)
    try:
        os.unlink(m.mnt / "f")
        assert not (m.mnt / "f").exists()
        assert os.pread(fd, 7, 7000 - 7) == b"keep me"
    finally:
        os.close(fd)
    deadline = time.monotonic() + 10  # release is asynchronous: poll for libfuse's hidden name to go
    while os.listdir(m.source) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert os.listdir(m.source) == []


@pytest.mark.parametrize("options, mode", [
    (["--compress"], "v1"),
    (["--abi", "v0", "--v0-fold", "ino"], "v0-ino"),
    (["--abi", "v1", "--host-spec", "v0"], "passthrough"),  # a v0-only host refuses v1: plain passthrough
])
def test_cache_modes_roundtrip(mount_factory: MountFactory, options: list[str], mode: str) -> None:
    m = mount_factory("--page-cache", "8K", *options)
    blob = bytes(range(256)) * 200 + os.urandom(5000)
    (m.source / "f").write_bytes(blob)
    wait_until_cacheable(m.source / "f")
    for _ in range(3):
        assert (m.mnt / "f").read_bytes() == blob
    stats = m.stats()
    assert stats["mode"] == mode
    assert (stats["succ_gets"] > 0) == (mode != "passthrough"), stats
