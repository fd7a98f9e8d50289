"""guestfs.mount helpers that need no real mount: FUSE kwargs, binding choice, log digging, errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from guestfs.config import MountConfig
from guestfs.mount import MountError, default_log_path, fuse_kwargs, last_error_line, load_binding, read_stats, unmount


def make_config(tmp_path: Path, **options: object) -> MountConfig:
    (tmp_path / "src").mkdir(exist_ok=True)
    (tmp_path / "mnt").mkdir(exist_ok=True)
    return MountConfig.create(str(tmp_path / "src"), str(tmp_path / "mnt"), **options)


def test_fuse_kwargs_always_carry_the_safety_options(tmp_path: Path) -> None:
    kwargs = fuse_kwargs(make_config(tmp_path))
    for name in ("foreground", "raw_fi", "auto_unmount", "use_ino", "nothreads"):
        assert kwargs[name] is True, name
    assert kwargs["attr_timeout"] == kwargs["entry_timeout"] == 1.0 and "ro" not in kwargs


def test_fuse_kwargs_follow_the_options(tmp_path: Path) -> None:
    config = make_config(tmp_path, threads="multi", read_only=True, attr_timeout=0.0,
                         fuse_options=("allow_other", "entry_timeout=5", "fsname=data"))
    kwargs = fuse_kwargs(config)
    assert "nothreads" not in kwargs and kwargs["ro"] is True and kwargs["attr_timeout"] == 0.0
    assert kwargs["allow_other"] is True and kwargs["entry_timeout"] == "5" and kwargs["fsname"] == "data"


def test_unknown_binding_is_a_mount_error() -> None:
    with pytest.raises(MountError, match="unknown FUSE binding"):
        load_binding("llfuse")


def test_last_error_line_prefers_libfuse_and_skips_older_runs(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_text("fuse: old failure from a previous daemon\n")
    start = log.stat().st_size
    with log.open("a") as out:
        out.write("INFO starting\nfuse: mountpoint is busy\nguestfs mount: MountError: boom\n")
    assert last_error_line(str(log), start) == "fuse: mountpoint is busy"
    with log.open("a") as out:
        out.write("INFO still fine\n")
    assert last_error_line(str(log), log.stat().st_size) == "(empty log)"
    assert last_error_line(str(tmp_path / "missing")) == "(no log)"


def test_default_log_path_is_per_user_and_mountpoint(tmp_path: Path) -> None:
    path = Path(default_log_path(str(tmp_path / "a b")))
    assert path.parent.name == f"guestfs-{os.getuid()}" and path.name.endswith("a b.log")
    assert "/" not in path.name


def test_stats_and_unmount_of_a_plain_directory_fail_cleanly(tmp_path: Path) -> None:
    with pytest.raises(MountError) as info:
        read_stats(str(tmp_path))
    assert "\n" not in str(info.value)
    with pytest.raises(MountError, match="cannot unmount"):
        unmount(str(tmp_path), timeout=10)


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), 0.0, -1.0])
def test_start_mount_refuses_a_timeout_that_never_expires(tmp_path: Path, timeout: float) -> None:
    from guestfs.mount import start_mount

    with pytest.raises(ValueError, match="finite number of seconds > 0"):
        start_mount(str(tmp_path), str(tmp_path / "mnt"), [], timeout=timeout)
    assert not (tmp_path / "mnt").exists()
