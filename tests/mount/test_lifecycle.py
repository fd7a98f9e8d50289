"""Daemon lifecycle: detached CLI mount/umount, SIGTERM/SIGINT unmount cleanly, kill -9 leaves no mount."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from guestfs.config import is_fuse_mount
from guestfs.mount import is_live, unmount
from tests.polling import wait_for

pytestmark = [pytest.mark.mount, pytest.mark.timeout(90, method="thread")]

BINDINGS = ["mfusepy", "fusepy"]
MountFactory = Callable[..., Any]




@pytest.mark.parametrize("binding", BINDINGS)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_unmounts_cleanly(mount_factory: MountFactory, binding: str, signum: int) -> None:
    m = mount_factory(binding=binding)
    (m.mnt / "f").write_bytes(b"x")
    m.handle.process.send_signal(signum)
    assert m.handle.process.wait(timeout=15) == 0  # RuntimeError(8) from libfuse3 counts as a clean exit
    assert wait_for(lambda: not is_fuse_mount(str(m.mnt)))
    log = Path(m.handle.log_path).read_text()
    assert "Traceback" not in log and "unmounted" in log


@pytest.mark.parametrize("binding", BINDINGS)
def test_kill_9_leaves_no_wedged_mount(mount_factory: MountFactory, binding: str) -> None:
    m = mount_factory(binding=binding)
    m.handle.process.kill()
    m.handle.process.wait(timeout=15)
    assert wait_for(lambda: not is_fuse_mount(str(m.mnt)), timeout=15)  # auto_unmount did it
    assert os.listdir(m.mnt) == []


def test_cli_mount_detaches_and_umount_unmounts(tmp_path: Path, require_fuse: None) -> None:
    source, mnt = tmp_path / "src", tmp_path / "mnt"
    source.mkdir()
    mnt.mkdir()
    (source / "hello").write_text("hi\n")
    log = tmp_path / "daemon.log"
    try:
        result = subprocess.run([sys.executable, "-m", "guestfs", "mount", str(source), str(mnt), "--log", str(log)],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert is_live(str(mnt)) and (mnt / "hello").read_text() == "hi\n"  # live on return, no waiting
        result = subprocess.run([sys.executable, "-m", "guestfs", "umount", str(mnt)], capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert not is_fuse_mount(str(mnt))
    finally:
        if is_fuse_mount(str(mnt)):
            unmount(str(mnt), lazy=True)


def test_cli_mount_failure_prints_daemon_error_and_exits_1(tmp_path: Path, require_fuse: None) -> None:
    source, mnt = tmp_path / "src", tmp_path / "mnt"
    source.mkdir()
    mnt.mkdir()
    env = {**os.environ, "FUSE_LIBRARY_PATH": str(tmp_path / "no-libfuse.so")}  # the daemon cannot load libfuse
    result = subprocess.run([sys.executable, "-m", "guestfs", "mount", str(source), str(mnt), "--fuse", "fusepy",
                             "--log", str(tmp_path / "log")], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "cannot load FUSE binding fusepy" in result.stderr
    assert not is_fuse_mount(str(mnt))


def test_umount_of_unmounted_dir_fails_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "guestfs", "umount", str(tmp_path)], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1


def test_umount_refuses_a_filesystem_that_is_not_guestfs(tmp_path: Path) -> None:
    """The last unmount fallback is plain umount: without the type check a typo could unmount anything."""
    target = tmp_path / "tmpfs"
    target.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "none", str(target)], capture_output=True, timeout=30).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        result = subprocess.run([sys.executable, "-m", "guestfs", "umount", str(target)], capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 1 and result.stderr.count("\n") == 1
        assert f"{target} is not a guestfs mount (it is a tmpfs mount)" in result.stderr
        assert os.path.ismount(target)
    finally:
        subprocess.run(["umount", str(target)], capture_output=True, timeout=30)


def test_umount_of_a_busy_mount_says_what_to_do(mount_factory: MountFactory) -> None:
    m = mount_factory()
    holder = subprocess.Popen(["sleep", "60"], cwd=m.mnt)  # a process whose working directory is inside
    try:
        result = subprocess.run([sys.executable, "-m", "guestfs", "umount", str(m.mnt)], capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 1 and result.stderr.count("\n") == 1
        assert "busy" in result.stderr and "close it, or use -z" in result.stderr
        assert is_live(str(m.mnt))
    finally:
        holder.kill()
        holder.wait(timeout=15)
