"""File keys: backing file -> kernel file handle -> 192-bit tmem object id (oid).

Linux's cleancache keyed a page by (pool = superblock, ``struct cleancache_filekey``, index).
The filekey was 24 bytes: the file handle from the filesystem's ``encode_fh`` (no parent) of at
most 6 u32 words, else the inode number; ``drivers/xen/tmem.c`` read those 24 bytes as the
oid's three little-endian u64 words. We do the same, from user space:

``source``         how the oid was made
``handle``         ``name_to_handle_at(fd, "", AT_EMPTY_PATH)`` gave <= 24 bytes: the bytes,
                   zero-padded to 24, read as three LE u64 words -- exactly Linux's oid.
``handle-hashed``  the handle is longer than 24 bytes (Linux skipped such files): the oid is
                   ``xxh3_128(t + h) | xxh64(t + h) << 128`` where ``t`` is handle_type as 4
                   bytes little-endian signed and ``h`` the handle bytes (192 bits).
``ino-gen``        no handles (EOPNOTSUPP: overlayfs without nfs_export, some FUSE filesystems):
                   ``ino | generation << 64`` with the generation from ``FS_IOC_GETVERSION``
                   (as SUSE's precache keyed by inode + generation).
``ino-ctime``      no handles and no generation ioctl: ``ino | ctime_ns << 64``; the key then
                   changes whenever the file's ctime does (old pages are orphaned, never served).
``synthetic``      made by callers (the lab) directly with ``FileKey(oid=..., source="synthetic")``.

The handle type is implicit per filesystem in Linux (one pool per superblock) and is not in the
oid. Here it *is* part of the identity: ``FileKey`` equality covers oid, source, handle_type,
handle, dev and ino, and the cleancache frontend's ownership guard refuses to let two unequal
keys share one oid in a pool (see ``guestfs.cleancache``). See docs/keying.md.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from dataclasses import dataclass, field

import xxhash

AT_EMPTY_PATH = 0x1000
AT_SYMLINK_FOLLOW = 0x400
AT_FDCWD = -100
MAX_HANDLE_SZ = 128
LINUX_KEY_BYTES = 24  # CLEANCACHE_KEY_MAX (6) u32 words
FS_IOC_GETVERSION = 0x80087601
SOURCES = ("handle", "handle-hashed", "ino-gen", "ino-ctime", "synthetic")
_OID_MAX = (1 << 192) - 1
_HANDLE_TYPE = struct.Struct("<i")


@dataclass(frozen=True, slots=True)
class FileKey:
    """One file's identity in the cache.

    Hashing is precomputed once (the key is hashed on every page-cache and cleancache lookup);
    equality still compares every identity field.
    """

    oid: int
    source: str
    handle_type: int = -1
    handle: bytes = b""
    dev: int = 0
    ino: int = 0
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 <= self.oid <= _OID_MAX:
            raise ValueError(f"FileKey oid {self.oid:#x} does not fit in 192 bits")
        if self.source not in SOURCES:
            raise ValueError(f"FileKey source {self.source!r} is not one of {', '.join(SOURCES)}")
        object.__setattr__(self, "_hash", hash((self.oid, self.handle_type, self.dev, self.ino)))

    def __hash__(self) -> int:
        return self._hash

    def identity_bytes(self) -> bytes:
        """The full identity as bytes: oid (24 B LE), handle_type (s32 LE), dev (u64 LE), ino (u64 LE).

        The v0 ``xxh64`` fold hashes exactly these bytes.
        """
        return (
            self.oid.to_bytes(24, "little")
            + _HANDLE_TYPE.pack(self.handle_type)
            + (self.dev & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little")
            + (self.ino & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little")
        )


class _FileHandle(ctypes.Structure):
    _fields_ = [
        ("handle_bytes", ctypes.c_uint),
        ("handle_type", ctypes.c_int),
        ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ),
    ]


def _load_name_to_handle_at() -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    libc = ctypes.CDLL(None, use_errno=True)
    func = libc.name_to_handle_at
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_FileHandle), ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    func.restype = ctypes.c_int
    return func


_NAME_TO_HANDLE_AT = _load_name_to_handle_at()  # a constant function pointer, loaded once


def file_handle(fd: int) -> tuple[int, bytes] | None:
    """(handle_type, handle bytes) of an open file, or None when the filesystem has no handles."""
    return _handle_at(fd, b"", AT_EMPTY_PATH, f"fd {fd}")


def path_handle(path: str) -> tuple[int, bytes] | None:
    """``file_handle`` of the file at ``path`` (symlinks followed) without opening it, so it needs no
    read or write permission on the file: the same handle its open descriptor would give."""
    return _handle_at(AT_FDCWD, os.fsencode(path), AT_SYMLINK_FOLLOW, path)


def _handle_at(dirfd: int, name: bytes, flags: int, what: str) -> tuple[int, bytes] | None:
    fh = _FileHandle()
    fh.handle_bytes = MAX_HANDLE_SZ
    mount_id = ctypes.c_int(0)
    if _NAME_TO_HANDLE_AT(dirfd, name, ctypes.byref(fh), ctypes.byref(mount_id), flags) == 0:
        return fh.handle_type, bytes(fh.f_handle[: fh.handle_bytes])
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS):
        return None
    raise OSError(err, f"name_to_handle_at({what}): {os.strerror(err)}", what if dirfd == AT_FDCWD else None)


def inode_generation(fd: int) -> int | None:
    """The inode generation from FS_IOC_GETVERSION (ext4, xfs, btrfs), or None where unsupported."""
    buf = bytearray(8)  # the kernel writes an int; the rest stays zero
    try:
        fcntl.ioctl(fd, FS_IOC_GETVERSION, buf)
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return None
        raise
    return int.from_bytes(buf, "little")


def oid_from_handle(handle_type: int, handle: bytes) -> tuple[int, str]:
    """(oid, source) for a handle: Linux's 24-byte filekey when it fits, else the 192-bit hash."""
    if len(handle) <= LINUX_KEY_BYTES:
        return int.from_bytes(handle, "little"), "handle"  # zero-padded LE words, as Linux
    data = _HANDLE_TYPE.pack(handle_type) + handle
    oid = xxhash.xxh3_128_intdigest(data) | xxhash.xxh64_intdigest(data) << 128
    return (oid ^ 1 if oid == _OID_MAX else oid), "handle-hashed"  # never the invalid oid


def key_from_stat(fd: int, st: os.stat_result) -> FileKey:
    """The key of an open file whose stat is already known (saves one fstat)."""
    found = file_handle(fd)
    if found is not None:
        return _handle_key(found, st)
    return _inode_key(fd, st)


def _handle_key(found: tuple[int, bytes], st: os.stat_result) -> FileKey:
    handle_type, handle = found
    oid, source = oid_from_handle(handle_type, handle)
    return FileKey(oid, source, handle_type, handle, st.st_dev, st.st_ino)


def _inode_key(fd: int, st: os.stat_result) -> FileKey:
    """No handles: (inode, generation) when the filesystem reports one, else (inode, ctime)."""
    generation = inode_generation(fd)
    if generation is not None:
        return FileKey(st.st_ino | generation << 64, "ino-gen", -1, b"", st.st_dev, st.st_ino)
    return FileKey(st.st_ino | st.st_ctime_ns << 64, "ino-ctime", -1, b"", st.st_dev, st.st_ino)


def key_for_fd(fd: int) -> FileKey:
    """The key of an open backing file: its kernel file handle, else (inode, generation|ctime)."""
    return key_from_stat(fd, os.fstat(fd))


def key_for_path(path: str) -> FileKey:
    """The key of the file at ``path`` (symlinks are followed), equal to ``key_for_fd`` of it opened.

    With file handles nothing is opened, so a file the daemon may not read or write (mode 0200 or 0000
    under a non-root daemon) still has its key for unlink, rename-over and truncate. Without handles the
    generation ioctl needs a descriptor: the file is opened briefly, read-only or else write-only.
    """
    st = os.stat(path)
    found = path_handle(path)
    if found is not None:
        return _handle_key(found, st)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except PermissionError:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        return _inode_key(fd, os.fstat(fd))
    finally:
        os.close(fd)
