"""guestfs.ops driven directly (no FUSE) on a temporary backing directory.

A recording stand-in PageIO checks that the coherence hooks fire with the right keys; a separate
test class runs the same data paths over the real cache stack.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from guestfs.filekey import FileKey, key_for_fd, key_for_path
from guestfs.ops import RENAME_EXCHANGE, RENAME_NOREPLACE, STATS_XATTR, UTIME_NOW, UTIME_OMIT, Ops


@dataclass
class FakeFileInfo:
    """Stands in for libfuse's fuse_file_info (raw_fi=True)."""

    flags: int
    fh: int = 0
    direct_io: int = 0


@dataclass
class RecordingPageIO:
    """Plain passthrough PageIO that records every coherence call."""

    calls: list[tuple[Any, ...]] = field(default_factory=list)
    fail_reads: bool = False
    first_chance: str = "daemon"
    backing_direct: bool = False
    keep_kernel_cache: bool = False

    def read(self, key: FileKey, fd: int, offset: int, size: int) -> bytes:
        if self.fail_reads:
            raise RuntimeError("simulated cache bug")
        self.calls.append(("read", key, offset, size))
        return os.pread(fd, size, offset)

    def write(self, key: FileKey, fd: int, data: bytes, offset: int, *, append: bool = False) -> int:
        self.calls.append(("write", key, offset, len(data)))
        return os.write(fd, data) if append else os.pwrite(fd, data, offset)

    def truncate(self, key: FileKey, length: int) -> None:
        self.calls.append(("truncate", key, length))


    def invalidate(self, key: FileKey) -> None:
        self.calls.append(("invalidate", key))
    def forget(self, key: FileKey) -> None:
        self.calls.append(("forget", key))

    def revalidate(self, key: FileKey, st: os.stat_result) -> None:
        self.calls.append(("revalidate", key, st.st_size))

    def kernel_open(self, key: FileKey, st: os.stat_result, *, writable: bool) -> tuple[bool, bool]:
        self.calls.append(("kernel_open", key, st.st_size, writable))
        return False, self.keep_kernel_cache

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [call for call in self.calls if call[0] == name]


@pytest.fixture
def backing(tmp_path: Path) -> Path:
    root = tmp_path / "backing"
    root.mkdir()
    (root / "dir").mkdir()
    (root / "dir" / "a.txt").write_bytes(b"hello world\n")
    return root


@pytest.fixture
def pageio() -> RecordingPageIO:
    return RecordingPageIO()


@pytest.fixture
def ops(backing: Path, pageio: RecordingPageIO) -> Ops:
    stats = {"mode": "v1", "hits": 3}
    return Ops(str(backing), pageio, key_for_fd=key_for_fd, key_for_path=key_for_path,  # type: ignore[arg-type]
               stats=lambda: dict(stats))


def open_file(ops: Ops, path: str, flags: int = os.O_RDONLY) -> FakeFileInfo:
    fi = FakeFileInfo(flags=flags)
    assert ops.open(path, fi) == 0
    return fi


def create_file(ops: Ops, path: str, data: bytes = b"", mode: int = 0o644) -> FakeFileInfo:
    fi = FakeFileInfo(flags=os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    assert ops.create(path, mode, fi) == 0
    if data:
        assert ops.write(path, data, 0, fi) == len(data)
    return fi


def errno_of(call: Any, *args: Any) -> int:
    with pytest.raises(OSError) as info:
        call(*args)
    return info.value.errno


class TestAttributes:
    def test_getattr_matches_lstat_with_ns_times(self, ops: Ops, backing: Path) -> None:
        attrs = ops.getattr("/dir/a.txt")
        st = os.lstat(backing / "dir" / "a.txt")
        assert attrs["st_size"] == 12 and attrs["st_ino"] == st.st_ino and attrs["st_mode"] == st.st_mode
        assert attrs["st_mtime"] == st.st_mtime_ns and attrs["st_ctime"] == st.st_ctime_ns

    def test_getattr_root_is_backing_root(self, ops: Ops, backing: Path) -> None:
        assert ops.getattr("/")["st_ino"] == os.lstat(backing).st_ino

    def test_getattr_with_open_fh_uses_fstat(self, ops: Ops, backing: Path) -> None:
        fi = open_file(ops, "/dir/a.txt")
        os.unlink(backing / "dir" / "a.txt")
        assert ops.getattr("/dir/a.txt", fi)["st_nlink"] == 0  # the open file, not the (gone) name
        ops.release("/dir/a.txt", fi)

    def test_missing_path_is_enoent(self, ops: Ops) -> None:
        assert errno_of(ops.getattr, "/nope") == errno.ENOENT

    def test_readdir_lists_dot_entries_and_names_with_inodes(self, ops: Ops, backing: Path) -> None:
        entries = {name: attrs for name, attrs, offset in ops.readdir("/dir", 0)}
        assert sorted(entries) == [".", "..", "a.txt"]
        a_stat = os.lstat(backing / "dir" / "a.txt")
        assert entries["a.txt"] == {"st_ino": a_stat.st_ino, "st_mode": stat.S_IFREG}  # type bits suffice
        assert entries["."]["st_ino"] == os.lstat(backing / "dir").st_ino
        assert entries[".."]["st_ino"] == os.lstat(backing).st_ino

    def test_readdir_reports_the_type_of_every_kind_of_entry(self, ops: Ops, backing: Path) -> None:
        os.symlink("a.txt", backing / "dir" / "link")
        os.mkfifo(backing / "dir" / "fifo")
        (backing / "dir" / "sub").mkdir()
        kinds = {name: stat.S_IFMT(attrs["st_mode"]) for name, attrs, _ in ops.readdir("/dir", 0)}
        assert kinds == {".": stat.S_IFDIR, "..": stat.S_IFDIR, "a.txt": stat.S_IFREG, "link": stat.S_IFLNK,
                         "fifo": stat.S_IFIFO, "sub": stat.S_IFDIR}

    def test_chmod_chown(self, ops: Ops, backing: Path) -> None:
        ops.chmod("/dir/a.txt", 0o600)
        ops.chown("/dir/a.txt", -1, os.getgid())
        assert stat.S_IMODE(os.stat(backing / "dir" / "a.txt").st_mode) == 0o600

    def test_statfs_reports_backing_filesystem(self, ops: Ops, backing: Path) -> None:
        result = ops.statfs("/")
        assert result["f_bsize"] == os.statvfs(backing).f_bsize and result["f_namemax"] > 0

    def test_access_passes_the_backing_errno_through(self, ops: Ops, backing: Path) -> None:
        assert ops.access("/dir/a.txt", os.R_OK) == 0
        assert errno_of(ops.access, "/nope", os.R_OK) == errno.ENOENT  # as faccessat says, not a blanket EACCES
        (backing / "dir" / "a.txt").chmod(0o644)
        expected = 0 if os.access(backing / "dir" / "a.txt", os.X_OK) else errno.EACCES  # (root: no x bit, EACCES)
        assert (errno_of(ops.access, "/dir/a.txt", os.X_OK) if expected else ops.access("/dir/a.txt", os.X_OK)) == expected


class TestUtimens:
    def test_explicit_times(self, ops: Ops, backing: Path) -> None:
        ops.utimens("/dir/a.txt", (1_000_000_123, 2_000_000_456))
        st = os.lstat(backing / "dir" / "a.txt")
        assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)

    def test_utime_now_sentinel_means_now_not_1970(self, ops: Ops, backing: Path) -> None:
        before = time.time_ns()
        ops.utimens("/dir/a.txt", (UTIME_NOW, UTIME_NOW))
        st = os.lstat(backing / "dir" / "a.txt")
        assert st.st_mtime_ns >= before - 10**9 and st.st_atime_ns >= before - 10**9

    def test_utime_omit_sentinel_keeps_that_time(self, ops: Ops, backing: Path) -> None:
        os.utime(backing / "dir" / "a.txt", ns=(5_000_000_000, 6_000_000_000))
        ops.utimens("/dir/a.txt", (UTIME_OMIT, 7_000_000_000))
        st = os.lstat(backing / "dir" / "a.txt")
        assert (st.st_atime_ns, st.st_mtime_ns) == (5_000_000_000, 7_000_000_000)

    def test_touch_atime_only(self, ops: Ops, backing: Path) -> None:
        os.utime(backing / "dir" / "a.txt", ns=(5_000_000_000, 6_000_000_000))
        ops.utimens("/dir/a.txt", (UTIME_NOW, UTIME_OMIT))
        st = os.lstat(backing / "dir" / "a.txt")
        assert st.st_mtime_ns == 6_000_000_000 and st.st_atime_ns > 6_000_000_000

    def test_none_means_now(self, ops: Ops, backing: Path) -> None:
        os.utime(backing / "dir" / "a.txt", ns=(5, 6))
        ops.utimens("/dir/a.txt", None)
        assert os.lstat(backing / "dir" / "a.txt").st_mtime_ns > 10**18


class TestFileData:
    def test_fallocate_passes_through_and_a_punched_hole_drops_the_pages(
            self, ops: Ops, pageio: RecordingPageIO, backing: Path) -> None:
        fi = create_file(ops, "/f", b"x" * 8192)
        assert ops.fallocate("/f", 0, 0, 4 * 4096, fi) == 0  # plain allocation: grows, changes no byte
        assert os.stat(backing / "f").st_size == 4 * 4096
        assert not [c for c in pageio.calls if c[0] == "invalidate"]
        punch = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        try:
            ops.fallocate("/f", punch, 0, 4096, fi)
        except OSError as exc:
            if exc.errno == errno.EOPNOTSUPP:
                pytest.skip("no hole punching on this file system")
            raise
        assert (backing / "f").read_bytes()[:4096] == bytes(4096)
        assert pageio.calls[-1][0] == "invalidate"
        assert errno_of(ops.fallocate, "/f", 0, -1, 10, fi) == errno.EINVAL  # the backing errno

    def test_open_sets_direct_io_and_reads_through_pageio(self, ops: Ops, pageio: RecordingPageIO) -> None:
        fi = open_file(ops, "/dir/a.txt")
        assert fi.direct_io == 1 and fi.fh > 0
        assert ops.read("/dir/a.txt", 5, 6, fi) == b"world"
        (read_call,) = pageio.named("read")
        assert read_call[2:] == (6, 5)
        assert pageio.named("revalidate")[0][2] == 12  # open revalidated with the fstat size
        ops.check()
        ops.release("/dir/a.txt", fi)
        assert ops.open_file_count() == 0

    def test_reopens_share_one_key_instance(self, ops: Ops, pageio: RecordingPageIO,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
        """Identity lets cache lookups skip FileKey.__eq__; the intern table stays bounded."""
        for _ in range(2):
            fi = open_file(ops, "/dir/a.txt")
            ops.read("/dir/a.txt", 1, 0, fi)
            ops.release("/dir/a.txt", fi)
        first, second = (call[1] for call in pageio.named("read"))
        assert first is second
        monkeypatch.setattr("guestfs.ops.CANONICAL_KEYS_MAX", 1)
        create_file(ops, "/other")
        assert len(ops._canonical_keys) == 1

    def test_create_write_read_roundtrip(self, ops: Ops, backing: Path, pageio: RecordingPageIO) -> None:
        fi = create_file(ops, "/new.bin", b"abc" * 1000, mode=0o640)
        assert fi.direct_io == 1
        assert (backing / "new.bin").read_bytes() == b"abc" * 1000
        assert stat.S_IMODE(os.stat(backing / "new.bin").st_mode) == 0o640
        assert pageio.named("write")[0][2:] == (0, 3000)
        # write-only opens get a read-write backing fd so PageIO may read partial pages
        assert ops.read("/new.bin", 3, 3, fi) == b"abc"
        ops.release("/new.bin", fi)

    def test_exclusive_create_of_an_existing_file_fails(self, ops: Ops, backing: Path) -> None:
        fi = FakeFileInfo(flags=os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        assert errno_of(ops.create, "/dir/a.txt", 0o644, fi) == errno.EEXIST
        assert (backing / "dir" / "a.txt").read_bytes() == b"hello world\n" and ops.open_file_count() == 0

    def test_o_direct_is_stripped_on_the_backing_open(self, ops: Ops) -> None:
        fi = open_file(ops, "/dir/a.txt", os.O_RDONLY | os.O_DIRECT)
        assert ops.read("/dir/a.txt", 3, 1, fi) == b"ell"  # unaligned: would be EINVAL with O_DIRECT
        ops.release("/dir/a.txt", fi)

    def test_open_with_o_trunc_truncates_cache(self, ops: Ops, backing: Path, pageio: RecordingPageIO) -> None:
        fi = open_file(ops, "/dir/a.txt", os.O_WRONLY | os.O_TRUNC)
        key = key_for_path(str(backing / "dir" / "a.txt"))
        assert pageio.named("truncate") == [("truncate", key, 0)]
        assert os.path.getsize(backing / "dir" / "a.txt") == 0
        ops.release("/dir/a.txt", fi)

    def test_truncate_by_path_and_by_fh(self, ops: Ops, backing: Path, pageio: RecordingPageIO) -> None:
        key = key_for_path(str(backing / "dir" / "a.txt"))
        ops.truncate("/dir/a.txt", 5)
        fi = open_file(ops, "/dir/a.txt", os.O_RDWR)
        ops.truncate("/dir/a.txt", 2, fi)
        assert pageio.named("truncate") == [("truncate", key, 5), ("truncate", key, 2)]
        assert (backing / "dir" / "a.txt").read_bytes() == b"he"
        ops.release("/dir/a.txt", fi)

    def test_flush_and_fsync(self, ops: Ops) -> None:
        fi = open_file(ops, "/dir/a.txt", os.O_RDWR)
        assert ops.flush("/dir/a.txt", fi) == 0
        assert ops.fsync("/dir/a.txt", 0, fi) == 0 and ops.fsync("/dir/a.txt", 1, fi) == 0
        ops.release("/dir/a.txt", fi)

    def test_unknown_fh_is_ebadf(self, ops: Ops) -> None:
        assert errno_of(ops.read, "/dir/a.txt", 1, 0, FakeFileInfo(flags=0, fh=999)) == errno.EBADF

    def test_release_twice_is_harmless(self, ops: Ops) -> None:
        fi = open_file(ops, "/dir/a.txt")
        ops.release("/dir/a.txt", fi)
        assert ops.release("/dir/a.txt", fi) == 0 and ops.open_file_count() == 0

    def test_internal_error_becomes_eio_and_state_is_unchanged(self, ops: Ops, pageio: RecordingPageIO) -> None:
        fi = open_file(ops, "/dir/a.txt")
        pageio.fail_reads = True
        assert errno_of(ops.read, "/dir/a.txt", 1, 0, fi) == errno.EIO
        ops.check()
        ops.release("/dir/a.txt", fi)

    def test_open_failure_leaks_no_fd(self, ops: Ops, backing: Path) -> None:
        def broken_key(fd: int) -> FileKey:
            raise RuntimeError("no key")

        ops._key_for_fd = broken_key
        before = len(os.listdir("/proc/self/fd"))
        assert errno_of(ops.open, "/dir/a.txt", FakeFileInfo(flags=os.O_RDONLY)) == errno.EIO
        assert len(os.listdir("/proc/self/fd")) == before and ops.open_file_count() == 0


class TestNamespace:
    def test_unlink_last_link_forgets_key(self, ops: Ops, backing: Path, pageio: RecordingPageIO) -> None:
        key = key_for_path(str(backing / "dir" / "a.txt"))
        ops.unlink("/dir/a.txt")
        assert pageio.named("forget") == [("forget", key)] and not (backing / "dir" / "a.txt").exists()

    def test_unlink_with_other_link_keeps_pages(self, ops: Ops, backing: Path, pageio: RecordingPageIO) -> None:
        ops.link("/dir/b.txt", "/dir/a.txt")
        assert os.stat(backing / "dir" / "a.txt").st_nlink == 2
        ops.unlink("/dir/a.txt")
        assert pageio.named("forget") == [] and (backing / "dir" / "b.txt").read_bytes() == b"hello world\n"

    def test_rename_over_existing_forgets_victim(self, ops: Ops, backing: Path, pageio: RecordingPageIO) -> None:
        (backing / "victim").write_bytes(b"old")
        victim = key_for_path(str(backing / "victim"))
        ops.rename("/dir/a.txt", "/victim")
        assert pageio.named("forget") == [("forget", victim)]
        assert (backing / "victim").read_bytes() == b"hello world\n"

    def test_rename_to_fresh_name_forgets_nothing(self, ops: Ops, backing: Path, pageio: RecordingPageIO) -> None:
        ops.rename("/dir/a.txt", "/fresh")
        assert pageio.named("forget") == [] and (backing / "fresh").exists()

    def test_rename_noreplace_refuses_and_changes_nothing(self, ops: Ops, backing: Path,
                                                         pageio: RecordingPageIO) -> None:
        (backing / "victim").write_bytes(b"old")
        assert errno_of(ops.rename, "/dir/a.txt", "/victim", RENAME_NOREPLACE) == errno.EEXIST
        assert (backing / "victim").read_bytes() == b"old" and (backing / "dir" / "a.txt").exists()
        assert pageio.named("forget") == []

    def test_rename_exchange_swaps_without_forgetting(self, ops: Ops, backing: Path,
                                                     pageio: RecordingPageIO) -> None:
        (backing / "other").write_bytes(b"other")
        ops.rename("/dir/a.txt", "/other", RENAME_EXCHANGE)
        assert (backing / "other").read_bytes() == b"hello world\n"
        assert (backing / "dir" / "a.txt").read_bytes() == b"other"
        assert pageio.named("forget") == []

    def test_mkdir_rmdir_symlink_readlink_mknod(self, ops: Ops, backing: Path) -> None:
        ops.mkdir("/sub", 0o755)
        assert (backing / "sub").is_dir()
        ops.symlink("/sub/link", "../dir/a.txt")
        assert ops.readlink("/sub/link") == "../dir/a.txt"
        ops.mknod("/sub/fifo", stat.S_IFIFO | 0o600, 0)
        assert stat.S_ISFIFO(os.lstat(backing / "sub" / "fifo").st_mode)
        assert errno_of(ops.rmdir, "/sub") == errno.ENOTEMPTY
        ops.unlink("/sub/link")
        ops.unlink("/sub/fifo")
        ops.rmdir("/sub")
        assert not (backing / "sub").exists()


class TestXattrs:
    def test_set_get_list_remove(self, ops: Ops) -> None:
        ops.setxattr("/dir/a.txt", "user.colour", b"blue", 0)
        assert ops.getxattr("/dir/a.txt", "user.colour") == b"blue"
        assert "user.colour" in ops.listxattr("/dir/a.txt")
        ops.removexattr("/dir/a.txt", "user.colour")
        assert errno_of(ops.getxattr, "/dir/a.txt", "user.colour") == errno.ENODATA

    def test_xattr_create_flag_is_passed_through(self, ops: Ops) -> None:
        ops.setxattr("/dir/a.txt", "user.x", b"1", 0)
        assert errno_of(ops.setxattr, "/dir/a.txt", "user.x", b"2", os.XATTR_CREATE) == errno.EEXIST

    def test_stats_xattr_is_json_hidden_and_read_only(self, ops: Ops) -> None:
        stats = json.loads(ops.getxattr("/", STATS_XATTR))
        assert stats == {"mode": "v1", "hits": 3, "open_files": 0}
        assert STATS_XATTR not in ops.listxattr("/")
        assert errno_of(ops.setxattr, "/", STATS_XATTR, b"{}", 0) == errno.EPERM
        assert errno_of(ops.removexattr, "/", STATS_XATTR) == errno.EPERM

    def test_stats_name_elsewhere_is_an_ordinary_xattr(self, ops: Ops) -> None:
        assert errno_of(ops.getxattr, "/dir/a.txt", STATS_XATTR) == errno.ENODATA


class TestOverTheRealStack:
    """Ops over build_stack(): tiny first-chance cache so reads go through tmem too."""

    @pytest.fixture
    def real(self, backing: Path) -> Any:
        from guestfs.stack import StackConfig, build_stack

        stack = build_stack(StackConfig(page_cache_pages=2, tmem_pages=64, abi="v1"))
        ops = Ops(str(backing), stack.pageio, key_for_fd=key_for_fd, key_for_path=key_for_path, stats=stack.stats)
        yield ops, stack
        stack.check()
        ops.check()
        stack.close()

    def read_all(self, ops: Ops, path: str) -> bytes:
        fi = open_file(ops, path)
        try:
            return ops.read(path, 1 << 20, 0, fi)
        finally:
            ops.release(path, fi)

    def test_reads_are_served_by_tmem_and_stay_correct(self, real: Any, backing: Path) -> None:
        ops, stack = real
        blob = os.urandom(10 * 4096 + 5)
        (backing / "f").write_bytes(blob)
        for _ in range(3):
            assert self.read_all(ops, "/f") == blob
        stats = json.loads(ops.getxattr("/", STATS_XATTR))
        assert stats["mode"] == "v1" and stats["succ_gets"] > 0 and stats["puts"] > 0

    def test_writes_through_ops_are_seen(self, real: Any, backing: Path) -> None:
        ops, _ = real
        (backing / "f").write_bytes(b"a" * 20000)
        assert self.read_all(ops, "/f") == b"a" * 20000
        fi = open_file(ops, "/f", os.O_RDWR)
        ops.write("/f", b"B" * 5000, 4000, fi)
        assert ops.read("/f", 20000, 0, fi) == b"a" * 4000 + b"B" * 5000 + b"a" * 11000
        ops.release("/f", fi)

    def test_external_change_and_truncate_are_seen(self, real: Any, backing: Path) -> None:
        ops, _ = real
        (backing / "f").write_bytes(b"x" * 12288)
        assert self.read_all(ops, "/f") == b"x" * 12288
        (backing / "f").write_bytes(b"y" * 9000)  # behind Ops' back
        assert self.read_all(ops, "/f") == b"y" * 9000
        ops.truncate("/f", 100)
        assert self.read_all(ops, "/f") == b"y" * 100

    def test_unlink_and_recreate_never_shows_old_pages(self, real: Any, backing: Path) -> None:
        ops, _ = real
        for generation in range(5):
            content = bytes([65 + generation]) * 8192
            fi = create_file(ops, "/g", content)
            ops.release("/g", fi)
            assert self.read_all(ops, "/g") == content
            assert self.read_all(ops, "/g") == content
            ops.unlink("/g")

    def test_rename_over_keeps_the_survivor_correct(self, real: Any, backing: Path) -> None:
        ops, _ = real
        (backing / "a").write_bytes(b"A" * 8192)
        (backing / "b").write_bytes(b"B" * 8192)
        assert self.read_all(ops, "/a") == b"A" * 8192 and self.read_all(ops, "/b") == b"B" * 8192
        ops.rename("/a", "/b")
        assert self.read_all(ops, "/b") == b"A" * 8192
