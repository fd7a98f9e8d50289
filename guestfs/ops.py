"""FUSE Operations for guestfs: a thin passthrough over a backing directory.

Written against the fusepy/mfusepy common subset (``raw_fi=True``, ``use_ns=True``) without importing
either binding (only :mod:`guestfs.mount` does): errors are plain ``OSError`` with an errno, which both
bindings turn into ``-errno``. Every data read and write goes through :class:`guestfs.pageio.PageIO`,
which owns the cache work; the handlers here only translate paths, keep the fh table and call the
PageIO coherence hooks.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import itertools
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from guestfs.filekey import AT_FDCWD

if TYPE_CHECKING:
    from guestfs.filekey import FileKey
    from guestfs.pageio import PageIO

STATS_XATTR = "user.guestfs.stats"
CANONICAL_KEYS_MAX = 65536

# libfuse3 hands utimensat's sentinels through unchanged (tv_sec 0, tv_nsec 2**30-1 / 2**30-2); with
# use_ns the bindings deliver them as these plain nanosecond values.
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_SYMLINK_NOFOLLOW = 0x100
FALLOC_FL_KEEP_SIZE = 0x01

# O_DIRECT on the backing fd would make pread into Python's unaligned buffers fail with EINVAL.
# O_APPEND is kept: the kernel's append offset comes from its cached size, which is stale after a write
# through another hard-link name or behind the mount; the backing fd's O_APPEND puts the bytes at the
# real end (PageIO.write(append=True)). O_CREAT/O_EXCL belong to create() only (kept there: an O_EXCL
# create must fail if the file appeared behind the mount since the lookup).
_STRIPPED_OPEN_FLAGS = os.O_DIRECT | os.O_NOCTTY
_CREATE_ONLY_FLAGS = os.O_CREAT | os.O_EXCL

_STAT_FIELDS = ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size", "st_rdev", "st_blocks", "st_blksize")
_STATVFS_FIELDS = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail",
                   "f_flag", "f_namemax")

_log = logging.getLogger(__name__)

_Handler = TypeVar("_Handler", bound=Callable[..., Any])


class FileInfo(Protocol):
    """The part of libfuse's ``fuse_file_info`` the handlers touch (raw_fi=True)."""

    flags: int
    fh: int
    direct_io: int
    keep_cache: int


@dataclass(frozen=True, slots=True)
class OpenFile:
    """One FUSE open: the backing descriptor and the cache key computed from it at open time."""

    fd: int
    key: FileKey
    append: bool = False  # opened O_APPEND: every write goes to the backing file's real end
    read_fd: int = -1  # --backing-direct: an O_DIRECT descriptor of the same file for misses (-1: fd)

    @property
    def reads_from(self) -> int:
        return self.fd if self.read_fd < 0 else self.read_fd


def fuse_callback(handler: _Handler) -> _Handler:
    """Let OSError through as errno; turn anything else into a logged EIO.

    Why catch BaseException: fusepy's own wrapper turns one into a silent 0-byte read (fusepy#124) and
    mfusepy aborts the whole mount, so this boundary is the only place it can become a sane errno.
    """

    @functools.wraps(handler)
    def guarded(*args: Any) -> Any:
        try:
            return handler(*args)
        except OSError:
            raise
        except BaseException as exc:
            _log.exception("internal error in %s", handler.__name__)
            raise OSError(errno.EIO, f"guestfs internal error in {handler.__name__}: {exc!r}") from exc

    return guarded  # type: ignore[return-value]


class Ops:
    """Passthrough of a backing directory; data reads/writes through PageIO.

    Caveats (also in docs/guestfs.md):

    * ``--first-chance daemon``: every open is direct_io (``fi.direct_io = 1``) so every read reaches
      the daemon and hit/miss accounting is exact. Consequences: ``mmap(MAP_SHARED)`` fails with
      ENODEV (MAP_PRIVATE works), the kernel does no readahead and no page caching of file data.
    * ``--first-chance kernel``: opens are cached; the kernel's page cache serves repeated reads and
      keeps its pages across an open only when PageIO says the file is unchanged since they were
      cached (``fi.keep_cache``, close-to-open); only its misses reach the daemon.
    * Attributes and lookups are cached by the kernel for ``attr_timeout``/``entry_timeout`` (1 s by
      default): a change made directly in the backing directory may show stale ``stat`` results for that
      long. File *data* is never stale: PageIO revalidates size/mtime/ctime on every read.
    * O_APPEND is kept on the backing descriptor, so an append lands at the backing file's real end
      even when the kernel's cached size is stale (another hard-link name, a writer behind the mount).
    * Permission checks are those of the daemon's credentials unless mounted with
      ``-o default_permissions``; the daemon does not switch to the caller's uid.
    * ``utimens`` sentinels (UTIME_NOW/UTIME_OMIT) are mapped to "now"/"keep" via a stat; that is not
      atomic with respect to a concurrent external change of the same timestamps.
    * The root's virtual xattr ``user.guestfs.stats`` (JSON of ``Stack.stats()``) is readable but not
      listed by ``listxattr`` and cannot be set or removed.
    * Rename flags (NOREPLACE/EXCHANGE) reach us only where the binding passes them (guestfs.mount
      patches mfusepy on libfuse3 to do so); libfuse2 never sends them.
    * An open file unlinked or renamed over through the mount is first renamed to ``.fuse_hiddenXXXX``
      by libfuse (no ``hard_remove``: with it, fstat of an open unlinked file fails, because the kernel
      asks for its attributes by path) and unlinked at its last close; its pages are forgotten then.
      Two libfuse consequences (bindfs shares them): renaming a hard link onto another, open link of the
      same file removes the source name (POSIX: nothing happens), and a rename that fails after libfuse
      hid its open target loses that target at its last close.
    * Paths are re-walked by name in the backing tree (like libfuse's passthrough example): a writer of
      the backing tree can race a directory-for-symlink swap. Not for untrusted backing trees.
    * Not implemented: copy_file_range, ioctl, lock forwarding (and with fusepy, which has no such
      callbacks: fallocate and lseek SEEK_DATA/SEEK_HOLE).
    """

    use_ns = True  # bindings exchange integer nanoseconds (float seconds are deprecated and lossy)

    def __init__(
        self,
        root: str,
        pageio: PageIO,
        *,
        key_for_fd: Callable[[int], FileKey],
        key_for_path: Callable[[str], FileKey],
        stats: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.root = os.path.realpath(root)
        self._pageio = pageio
        self._key_for_fd = key_for_fd
        self._key_for_path = key_for_path
        self._stats = stats
        self._files: dict[int, OpenFile] = {}
        # One FileKey instance per file, reused across opens: cache lookups then compare keys by identity
        # instead of calling the dataclass __eq__ (5 % of daemon time on sequential hits). Bounded crudely:
        # cleared when full, which costs nothing but a few __eq__ calls until the keys are seen again.
        self._canonical_keys: dict[FileKey, FileKey] = {}
        self._fh_numbers = itertools.count(1)
        self._fh_guard = threading.Lock()  # not named "lock": that name is a FUSE callback
        self._kernel_first_chance = pageio.first_chance == "kernel"
        self._direct_refused = False

    # -- the one path-translation point ------------------------------------------------------------

    def _backing(self, path: str) -> str:
        """FUSE paths are absolute and normalised by the kernel ("/", "/a/b"); no ".." can appear."""
        return self.root if path == "/" else self.root + path

    # -- fh table ---------------------------------------------------------------------------------

    def _canonical(self, key: FileKey) -> FileKey:
        if len(self._canonical_keys) >= CANONICAL_KEYS_MAX:
            self._canonical_keys.clear()
        return self._canonical_keys.setdefault(key, key)

    def _register(self, fd: int, fi: FileInfo, truncated: bool) -> int:
        read_fd = -1
        try:
            key = self._canonical(self._key_for_fd(fd))
            if truncated:
                self._pageio.truncate(key, 0)
            st = os.fstat(fd)
            self._pageio.revalidate(key, st)
            direct_io, keep_cache = True, False  # daemon first chance: every read reaches the daemon
            if self._kernel_first_chance:
                direct_io, keep_cache = self._pageio.kernel_open(key, st, writable=fi.flags & os.O_ACCMODE != os.O_RDONLY)
            if self._pageio.backing_direct and fi.flags & os.O_ACCMODE != os.O_WRONLY:
                read_fd = self._direct_reader(fd)
        except BaseException:
            os.close(fd)
            raise
        with self._fh_guard:
            fh = next(self._fh_numbers)
            self._files[fh] = OpenFile(fd, key, append=bool(fi.flags & os.O_APPEND), read_fd=read_fd)
        fi.fh = fh
        fi.direct_io = int(direct_io)
        fi.keep_cache = int(keep_cache)
        return 0

    def _direct_reader(self, fd: int) -> int:
        """An O_DIRECT descriptor of the file behind ``fd`` (reopened through /proc, so the same
        inode whatever happened to its name), or -1 -- with a one-line notice, once -- where the
        backing filesystem refuses O_DIRECT (tmpfs, some FUSE and network filesystems)."""
        try:
            return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as exc:
            if not self._direct_refused:
                self._direct_refused = True
                _log.warning("--backing-direct: %s refuses O_DIRECT (%s); misses read through the host page "
                             "cache instead", self.root, exc.strerror)
            return -1

    def _open_file(self, fi: FileInfo) -> OpenFile:
        try:
            return self._files[fi.fh]
        except KeyError:
            raise OSError(errno.EBADF, "unknown FUSE file handle") from None

    def _maybe_open_file(self, fi: FileInfo | None) -> OpenFile | None:
        return None if fi is None else self._files.get(fi.fh)

    def open_file_count(self) -> int:
        return len(self._files)

    def check(self) -> None:
        """Invariants: every fh maps to a live descriptor; fh numbers are unique by construction."""
        for fh, open_file in list(self._files.items()):
            assert fh > 0, fh
            os.fstat(open_file.fd)  # raises EBADF if a descriptor leaked closed
            os.fstat(open_file.reads_from)

    # -- attributes and directories ---------------------------------------------------------------

    @fuse_callback
    def getattr(self, path: str, fh: FileInfo | None = None) -> dict[str, int]:
        open_file = self._maybe_open_file(fh)
        st = os.fstat(open_file.fd) if open_file else os.lstat(self._backing(path))
        attrs = {name: getattr(st, name) for name in _STAT_FIELDS}
        attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        return attrs

    @fuse_callback
    def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
        """Entries with st_ino and st_mode: with use_ino a zero d_ino would make glibc skip the entry."""
        backing = self._backing(path)
        here, parent = os.lstat(backing), os.lstat(os.path.dirname(backing) or "/")
        listing = [(".", here.st_ino, here.st_mode), ("..", parent.st_ino, parent.st_mode)]
        with os.scandir(backing) as scan:
            listing += [(entry.name, entry.inode(), _dirent_mode(entry)) for entry in scan]
        return [(name, {"st_ino": ino, "st_mode": mode}, 0) for name, ino, mode in listing]

    @fuse_callback
    def access(self, path: str, amode: int) -> int:
        """faccessat(2) itself, for its errno (EROFS, EPERM on an immutable file, ...), not just EACCES."""
        _check_libc(_libc().faccessat(AT_FDCWD, os.fsencode(self._backing(path)), amode, AT_SYMLINK_NOFOLLOW), path)
        return 0

    @fuse_callback
    def chmod(self, path: str, mode: int) -> int:
        os.chmod(self._backing(path), mode)
        return 0

    @fuse_callback
    def chown(self, path: str, uid: int, gid: int) -> int:
        os.lchown(self._backing(path), uid, gid)
        return 0

    @fuse_callback
    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        backing = self._backing(path)
        os.utime(backing, ns=_resolve_utimens(backing, times), follow_symlinks=False)
        return 0

    @fuse_callback
    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self._backing(path))
        return {name: getattr(st, name) for name in _STATVFS_FIELDS}

    @fuse_callback
    def mkdir(self, path: str, mode: int) -> int:
        os.mkdir(self._backing(path), mode)
        return 0

    @fuse_callback
    def rmdir(self, path: str) -> int:
        os.rmdir(self._backing(path))
        return 0

    @fuse_callback
    def mknod(self, path: str, mode: int, dev: int) -> int:
        os.mknod(self._backing(path), mode, dev)
        return 0

    @fuse_callback
    def symlink(self, path: str, target: str) -> int:
        """mfusepy/fusepy call symlink(link_path, link_contents)."""
        os.symlink(target, self._backing(path))
        return 0

    @fuse_callback
    def readlink(self, path: str) -> str:
        return os.readlink(self._backing(path))

    @fuse_callback
    def link(self, path: str, existing: str) -> int:
        """mfusepy/fusepy call link(new_path, existing_path)."""
        os.link(self._backing(existing), self._backing(path), follow_symlinks=False)
        return 0

    # -- namespace changes with cache coherence ---------------------------------------------------

    @fuse_callback
    def unlink(self, path: str) -> int:
        backing = self._backing(path)
        victim = self._last_link_key(backing)
        os.unlink(backing)
        if victim is not None:
            self._pageio.forget(victim)
        return 0

    @fuse_callback
    def rename(self, old: str, new: str, flags: int = 0) -> int:
        source, target = self._backing(old), self._backing(new)
        victim = None if flags & RENAME_EXCHANGE else self._last_link_key(target)
        if flags:
            _renameat2(source, target, flags)
        else:
            os.rename(source, target)
        if victim is not None:
            self._pageio.forget(victim)
        return 0

    def _last_link_key(self, backing: str) -> FileKey | None:
        """Key of a regular file whose last name is about to go (its cached pages become garbage)."""
        try:
            st = os.lstat(backing)
        except FileNotFoundError:
            return None
        if not (_is_regular(st.st_mode) and st.st_nlink == 1):
            return None
        return self._key_for_path(backing)

    # -- file data ---------------------------------------------------------------------------------

    @fuse_callback
    def open(self, path: str, fi: FileInfo) -> int:
        fd = _open_backing(self._backing(path), fi.flags & ~(_STRIPPED_OPEN_FLAGS | _CREATE_ONLY_FLAGS))
        return self._register(fd, fi, truncated=bool(fi.flags & os.O_TRUNC))

    @fuse_callback
    def create(self, path: str, mode: int, fi: FileInfo) -> int:
        flags = (fi.flags & ~_STRIPPED_OPEN_FLAGS) | os.O_CREAT
        fd = _open_backing(self._backing(path), flags, mode)
        return self._register(fd, fi, truncated=bool(fi.flags & os.O_TRUNC))

    def read(self, path: str, size: int, offset: int, fh: FileInfo) -> bytes:
        """The hot path, so ``fuse_callback``'s boundary is inlined here (one Python frame less per read)."""
        try:
            open_file = self._files.get(fh.fh)
            if open_file is None:
                raise OSError(errno.EBADF, "unknown FUSE file handle")
            return self._pageio.read(open_file.key, open_file.reads_from, offset, size)
        except OSError:
            raise
        except BaseException as exc:  # as fuse_callback: logged, and EIO instead of the binding's guess
            _log.exception("internal error in read")
            raise OSError(errno.EIO, f"guestfs internal error in read: {exc!r}") from exc

    @fuse_callback
    def write(self, path: str, data: bytes, offset: int, fh: FileInfo) -> int:
        open_file = self._open_file(fh)
        return self._pageio.write(open_file.key, open_file.fd, data, offset, append=open_file.append)

    @fuse_callback
    def truncate(self, path: str, length: int, fh: FileInfo | None = None) -> int:
        open_file = self._maybe_open_file(fh)
        if open_file is not None:
            os.ftruncate(open_file.fd, length)
            self._pageio.truncate(open_file.key, length)
            return 0
        backing = self._backing(path)
        key = self._key_for_path(backing)  # first: a file whose key cannot be had is left untouched
        os.truncate(backing, length)
        self._pageio.truncate(key, length)
        return 0

    @fuse_callback
    def fallocate(self, path: str, mode: int, offset: int, length: int, fh: FileInfo) -> int:
        """fallocate(2) on the backing file (mfusepy; fusepy has no such callback). A mode that changes
        bytes (punch hole, zero range; the kernel's FUSE client refuses collapse and insert range itself)
        drops the file's cached pages; plain allocation changes no byte (growth past the end is seen by
        the size check on read)."""
        open_file = self._open_file(fh)
        _check_libc(_libc().fallocate(open_file.fd, mode, ctypes.c_int64(offset), ctypes.c_int64(length)), path)
        if mode & ~FALLOC_FL_KEEP_SIZE:
            self._pageio.invalidate(open_file.key)
        return 0

    @fuse_callback
    def lseek(self, path: str, offset: int, whence: int, fh: FileInfo) -> int:
        """SEEK_DATA/SEEK_HOLE (the kernel handles the other whences itself) on the backing file; our
        reads and writes are positional, so moving the backing descriptor's offset is harmless."""
        return os.lseek(self._open_file(fh).fd, offset, whence)

    @fuse_callback
    def flush(self, path: str, fh: FileInfo) -> int:
        """Like libfuse's passthrough: close a dup so close-time errors (e.g. NFS backing) surface."""
        os.close(os.dup(self._open_file(fh).fd))
        return 0

    @fuse_callback
    def fsync(self, path: str, datasync: int, fh: FileInfo) -> int:
        fd = self._open_file(fh).fd
        if datasync:
            os.fdatasync(fd)
        else:
            os.fsync(fd)
        return 0

    @fuse_callback
    def release(self, path: str, fh: FileInfo) -> int:
        with self._fh_guard:
            open_file = self._files.pop(fh.fh, None)
        if open_file is not None:
            os.close(open_file.fd)
            if open_file.read_fd >= 0:
                os.close(open_file.read_fd)
        return 0

    # -- extended attributes (and the virtual stats attribute on the root) -------------------------

    @fuse_callback
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        if path == "/" and name == STATS_XATTR and self._stats is not None:
            return self.stats_json().encode()
        return os.getxattr(self._backing(path), name, follow_symlinks=False)

    @fuse_callback
    def listxattr(self, path: str) -> list[str]:
        return os.listxattr(self._backing(path), follow_symlinks=False)

    @fuse_callback
    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> int:
        self._refuse_stats_xattr(path, name)
        os.setxattr(self._backing(path), name, value, options, follow_symlinks=False)
        return 0

    @fuse_callback
    def removexattr(self, path: str, name: str) -> int:
        self._refuse_stats_xattr(path, name)
        os.removexattr(self._backing(path), name, follow_symlinks=False)
        return 0

    def _refuse_stats_xattr(self, path: str, name: str) -> None:
        if path == "/" and name == STATS_XATTR:
            raise OSError(errno.EPERM, f"{STATS_XATTR} is read-only")

    def stats_json(self) -> str:
        assert self._stats is not None
        return json.dumps({**self._stats(), "open_files": len(self._files)}, sort_keys=True)


def _open_backing(backing: str, flags: int, mode: int = 0o777) -> int:
    """Open write-only files read-write when allowed, so PageIO can fill partial pages on writes."""
    if flags & os.O_ACCMODE == os.O_WRONLY:
        try:
            return os.open(backing, (flags & ~os.O_ACCMODE) | os.O_RDWR, mode)
        except PermissionError:
            pass  # e.g. mode 0200: fall back to what the caller asked for
    return os.open(backing, flags, mode)


def _dirent_mode(entry: os.DirEntry[str]) -> int:
    """File-type bits for a directory entry; the kernel uses only these (from d_type, no lstat needed)."""
    if entry.is_symlink():
        return stat.S_IFLNK
    if entry.is_dir(follow_symlinks=False):
        return stat.S_IFDIR
    if entry.is_file(follow_symlinks=False):
        return stat.S_IFREG
    return stat.S_IFMT(entry.stat(follow_symlinks=False).st_mode)  # fifo, socket, device: rare, so lstat


def _is_regular(mode: int) -> bool:
    return stat.S_ISREG(mode)


def _resolve_utimens(backing: str, times: tuple[int, int] | None) -> tuple[int, int]:
    """Map (atime_ns, mtime_ns) with UTIME_NOW/UTIME_OMIT sentinels to concrete nanoseconds."""
    now = time.time_ns()
    if times is None:
        return now, now
    if UTIME_OMIT in times:
        st = os.lstat(backing)
        current = (st.st_atime_ns, st.st_mtime_ns)
    else:
        current = (now, now)
    return tuple(  # type: ignore[return-value]
        now if value == UTIME_NOW else old if value == UTIME_OMIT else value
        for value, old in zip(times, current)
    )


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check_libc(result: int, path: str) -> None:
    """A libc call's -1 as the OSError os.* would raise (errno, its text, the path)."""
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)


def _renameat2(source: str, target: str, flags: int) -> None:
    """renameat2(2) for RENAME_NOREPLACE/RENAME_EXCHANGE (no stdlib wrapper in Python 3.11)."""
    _check_libc(_libc().renameat2(AT_FDCWD, os.fsencode(source), AT_FDCWD, os.fsencode(target), ctypes.c_uint(flags)),
                target)
