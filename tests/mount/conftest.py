"""Real-mount fixtures: a guestfs daemon in a subprocess, live-checked, always unmounted.

Pattern (fuse-notes §6.1, pyfuse3's test/util.py): subprocess with auto_unmount, wait until listed AND
stat-able with a bounded timeout, unmount in ``finally`` (fusermount3 -u, fusermount -u, umount, lazy).
"""

from __future__ import annotations

import ctypes.util
import importlib.util
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


def binding_unavailable_reason(binding: str) -> str | None:
    """fusepy needs the `fuse` module (pip extra "fusepy") and libfuse2; mfusepy needs libfuse3."""
    module, library = {"mfusepy": ("mfusepy", "fuse3"), "fusepy": ("fuse", "fuse")}[binding]
    if importlib.util.find_spec(module) is None:
        return f"{binding} is not installed (pip install '.[fusepy]')"
    if ctypes.util.find_library(library) is None:
        return f"lib{library} is not installed"
    return None


@dataclass
class Mounted:
    source: Path
    mnt: Path
    handle: MountHandle

    def stats(self) -> dict[str, object]:
        return self.handle.stats()


MountFactory = Callable[..., Mounted]
FIRST_CHANCES = ("daemon", "kernel")


@pytest.fixture
def require_fuse() -> None:
    reason = fuse_unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def mount_factory(tmp_path: Path, require_fuse: None) -> Iterator[MountFactory]:
    """``mount_factory(*args, binding="mfusepy", first_chance="daemon", source=None)`` → a live Mounted;
    unmounted at teardown. Tests mount ``--first-chance daemon`` unless they say otherwise: its every read
    reaches the daemon, so they can count hits exactly; the tests of ``kernel`` (the CLI's default) pass
    ``first_chance="kernel"`` (``FIRST_CHANCES`` parametrizes both)."""
    handles: list[MountHandle] = []

    def factory(*args: str, binding: str = "mfusepy", first_chance: str = "daemon",
                source: Path | None = None) -> Mounted:
        reason = binding_unavailable_reason(binding)
        if reason:
            pytest.skip(reason)
        index = len(handles)
        if source is None:
            source = tmp_path / f"src{index}"
            source.mkdir()
        mnt = tmp_path / f"mnt{index}"
        mnt.mkdir()
        handle = start_mount(str(source), str(mnt), ["--fuse", binding, "--first-chance", first_chance, *args], timeout=15.0,
                             log_path=str(tmp_path / f"daemon{index}.log"))
        handles.append(handle)
        return Mounted(source, mnt, handle)

    try:
        yield factory
    finally:
        for handle in reversed(handles):
            handle.unmount(timeout=10.0)
