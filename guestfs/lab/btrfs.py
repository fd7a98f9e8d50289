"""A throwaway btrfs with two subvolumes whose files share inode numbers: the v0/v1 keying proof.

btrfs numbers inodes per subvolume (the first file in each is 257), so two subvolumes holding
the same names created in the same order have identical ``st_ino`` for different files. A v0
guest that keyed files by inode number alone would serve one subvolume's pages for the other;
the v1 handle carries the subvolume's root id, so v1 keys differ.

    with btrfs_subvolume_image(workdir) as image:
        image.files["a"][0], image.files["b"][0]    # same st_ino, different bytes

Needs root, a free loop device and btrfs-progs; ``btrfs_unavailable_reason()`` says why not.
Every external command has a bounded timeout and the image is always unmounted and detached.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

SUBVOLUMES = ("a", "b")
FILE_NAMES = ("alpha.bin", "beta.bin", "gamma.bin", "delta.bin")
FILE_PAGES = (3, 5, 2, 4)  # several pages each, the last one partial
COMMAND_TIMEOUT = 60.0


@dataclass
class BtrfsImage:
    """A mounted btrfs image: ``files[subvolume]`` lists that subvolume's files in creation order."""

    image: Path
    loop_device: str
    mountpoint: Path
    files: dict[str, list[Path]] = field(default_factory=dict)

    def subvolume(self, name: str) -> Path:
        return self.mountpoint / name


def btrfs_unavailable_reason() -> str | None:
    """Why a btrfs loop image cannot be made here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (losetup and mount)"
    for tool in ("losetup", "mkfs.btrfs", "btrfs", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} not found (install btrfs-progs / util-linux)"
    if not Path("/dev/loop-control").exists():
        return "no /dev/loop-control (loop devices unavailable)"
    try:
        with open("/proc/filesystems") as f:
            known = f.read()
    except OSError as exc:
        return f"cannot read /proc/filesystems: {exc}"
    if "btrfs" not in known:
        probe = _run(["modprobe", "btrfs"], check=False)
        if probe.returncode != 0:
            return "the kernel has no btrfs support"
    return None


def file_bytes(subvolume: str, name_index: int) -> bytes:
    """The deterministic content of one file: every 8-byte word names subvolume, file and word."""
    pages = FILE_PAGES[name_index]
    size = pages * 4096 - 1000
    tag = (ord(subvolume) << 56) | (name_index << 48)
    return b"".join((tag | word).to_bytes(8, "little") for word in range(size // 8))


@contextmanager
def btrfs_subvolume_image(workdir: Path, size_mb: int = 128) -> Iterator[BtrfsImage]:
    """Make, mount and populate the image; always unmount and detach afterwards."""
    reason = btrfs_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"btrfs image unavailable: {reason}")
    if size_mb < 114:
        raise ValueError(f"mkfs.btrfs needs at least 114 MiB, got size_mb={size_mb}")
    workdir.mkdir(parents=True, exist_ok=True)
    image = Path(tempfile.mkdtemp(prefix="btrfs-", dir=workdir)) / "image.btrfs"
    with open(image, "wb") as f:
        f.truncate(size_mb << 20)  # sparse
    loop_device = ""
    mountpoint = image.parent / "mnt"
    mountpoint.mkdir()
    mounted = False
    try:
        loop_device = _run(["losetup", "-f", "--show", str(image)]).stdout.strip()
        _run(["mkfs.btrfs", "-q", loop_device])
        _run(["mount", "-t", "btrfs", loop_device, str(mountpoint)])
        mounted = True
        result = BtrfsImage(image, loop_device, mountpoint)
        _populate(result)
        yield result
    finally:
        if mounted:
            mounted = _run(["umount", str(mountpoint)], check=False).returncode != 0
        if loop_device:
            _run(["losetup", "-d", loop_device], check=False)
        if not mounted:  # never delete through a mount that would not go away
            shutil.rmtree(image.parent, ignore_errors=True)


def _populate(image: BtrfsImage) -> None:
    for subvolume in SUBVOLUMES:
        _run(["btrfs", "subvolume", "create", str(image.subvolume(subvolume))])
        image.files[subvolume] = []
        for index, name in enumerate(FILE_NAMES):
            path = image.subvolume(subvolume) / name
            path.write_bytes(file_bytes(subvolume, index))
            image.files[subvolume].append(path)
    _run(["sync", "-f", str(image.mountpoint)], check=False)
    for a, b in zip(image.files["a"], image.files["b"]):
        ino_a, ino_b = a.stat().st_ino, b.stat().st_ino
        if ino_a != ino_b:
            raise RuntimeError(f"expected equal inode numbers in both subvolumes: {a} {ino_a} vs {b} {ino_b}")


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {detail[-1] if detail else ''}")
    return result
