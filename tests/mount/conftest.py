"""Real-mount fixtures: a guestfs daemon in a subprocess, live-checked, always unmounted.

Pattern (fuse-notes §6.1, pyfuse3's test/util.py): subprocess with auto_unmount, wait until listed AND
stat-able with a bounded timeout, unmount in ``finally`` (fusermount3 -u, fusermount -u, umount, lazy).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from guestfs.mount import MountHandle, start_mount

def fuse_unavailable_reason() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK) and shutil.which("fusermount3") is None:
        return "/dev/fuse is not accessible and fusermount3 is missing"
    return None


@dataclass
class Mounted:
    source: Path
    mnt: Path
    handle: MountHandle

    def stats(self) -> dict[str, object]:
        return self.handle.stats()


MountFactory = Callable[..., Mounted]


@pytest.fixture
def mount_factory(tmp_path: Path) -> Iterator[MountFactory]:
    """``mount_factory(*args, binding="mfusepy", source=None)`` → a live Mounted; unmounted at teardown."""
    reason = fuse_unavailable_reason()
    if reason:
        pytest.skip(reason)
    handles: list[MountHandle] = []

    def factory(*args: str, binding: str = "mfusepy", source: Path | None = None) -> Mounted:
        index = len(handles)
        if source is None:
            source = tmp_path / f"src{index}"
            source.mkdir()
        mnt = tmp_path / f"mnt{index}"
        mnt.mkdir()
        handle = start_mount(str(source), str(mnt), ["--fuse", binding, *args], timeout=15.0,
                             log_path=str(tmp_path / f"daemon{index}.log"))
        handles.append(handle)
        return Mounted(source, mnt, handle)

    try:
        yield factory
    finally:
        for handle in reversed(handles):
            handle.unmount(timeout=10.0)
