"""guestfs: a FUSE passthrough filesystem with a tmem second-chance page cache.

Public API (a test asserts ``__all__`` is exactly what is public). Importing guestfs never imports a
FUSE binding; only :mod:`guestfs.mount` does, when a mount starts.
"""

from __future__ import annotations

from .cleancache import CleanCache
from .config import MountConfig, parse_size
from .filekey import FileKey, key_for_fd, key_for_path
from .mount import MountError, MountHandle, start_mount, unmount
from .ops import Ops
from .pageio import PageIO
from .stack import Stack, StackConfig, build_stack

__all__ = sorted([
    "CleanCache",
    "FileKey",
    "MountConfig",
    "MountError",
    "MountHandle",
    "Ops",
    "PageIO",
    "Stack",
    "StackConfig",
    "build_stack",
    "key_for_fd",
    "key_for_path",
    "parse_size",
    "start_mount",
    "unmount",
])
