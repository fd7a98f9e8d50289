"""Mounting guestfs: the only module that imports a FUSE binding (lazily).

* :func:`mount` runs the filesystem in the foreground (blocks until unmounted).
* :func:`start_mount` runs ``python -m guestfs mount -f ...`` as a detached subprocess and returns a
  :class:`MountHandle` once the mount is live (listed as a FUSE mount in /proc/mounts AND a ``stat`` of
  it succeeds); ``guestfs mount`` without ``-f`` uses it too, like sshfs.
* :func:`unmount` tries ``fusermount3 -u``, then ``fusermount -u``, then ``umount``.

Binding choice: mfusepy on libfuse3 by default (we set ``FUSE_LIBRARY_NAME=fuse3`` unless the user set
``FUSE_LIBRARY_NAME``/``FUSE_LIBRARY_PATH``, because mfusepy would otherwise load libfuse2 first);
``--fuse fusepy`` (or ``GUESTFS_FUSE=fusepy``) uses fusepy on libfuse2.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guestfs.config import MountConfig, is_fuse_mount
from guestfs.ops import STATS_XATTR, Ops

_log = logging.getLogger(__name__)

POLL_INTERVAL = 0.02  # seconds between liveness polls (polling with a deadline, never a fixed wait)
LIBFUSE3_SIGNAL_EXIT = 8  # fuse_main's result after its loop ended by SIGINT/SIGTERM/SIGHUP (lib/helper.c)


class MountError(RuntimeError):
    """A mount did not come up, or an unmount failed; the message is one line."""


# -- binding -----------------------------------------------------------------------------------------


def load_binding(name: str) -> types.ModuleType:
    """Import mfusepy (on libfuse3 unless told otherwise) or fusepy; raises MountError with one line."""
    if name == "mfusepy":
        if "FUSE_LIBRARY_NAME" not in os.environ and "FUSE_LIBRARY_PATH" not in os.environ:
            os.environ["FUSE_LIBRARY_NAME"] = "fuse3"  # mfusepy loads libfuse2 first otherwise
        module_name = "mfusepy"
    elif name == "fusepy":
        module_name = "fuse"
    else:
        raise MountError(f"unknown FUSE binding {name!r} (use mfusepy or fusepy)")
    try:
        module = importlib.import_module(module_name)
    except (ImportError, OSError) as exc:  # OSError: the shared library itself is missing
        raise MountError(f"cannot load FUSE binding {name}: {exc}") from exc
    if not hasattr(module, "FUSE"):  # python-fuse also installs a module called "fuse"
        raise MountError(f"module {module_name!r} is not {name} (no FUSE class); pip install {name}")
    return module


def libfuse_major(binding: types.ModuleType) -> int:
    return int(getattr(binding, "fuse_version_major", 2))  # fusepy only knows libfuse2


def _fuse_class(binding: types.ModuleType) -> type:
    """mfusepy on libfuse3, completed: its rename_fuse_3 drops libfuse3's rename flags (we pass them on:
    NOREPLACE/EXCHANGE), and it declares libfuse3's lseek callback without a wrapper (we add one, so
    SEEK_DATA/SEEK_HOLE reach the backing file and sparse files stay sparse for cp)."""
    if binding.__name__ != "mfusepy" or libfuse_major(binding) != 3:
        return binding.FUSE

    class GuestFUSE(binding.FUSE):  # type: ignore[name-defined,misc]
        def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
            decode = self.encoding, self.errors
            return self.operations.rename(old.decode(*decode), new.decode(*decode), flags)  # type: ignore[no-any-return]

        def lseek(self, path: bytes | None, offset: int, whence: int, fip: Any) -> int:
            fh = fip.contents if self.raw_fi else fip.contents.fh
            name = None if path is None else path.decode(self.encoding, self.errors)
            return self.operations.lseek(name, offset, whence, fh)  # type: ignore[no-any-return]

    return GuestFUSE


class _FusepyOps(Ops):
    """fusepy dispatches every callback through ``operations(name, *args)``; mfusepy ignores __call__.

    fusepy copies ``flag_*`` attributes into libfuse2's ``fuse_operations``: ``flag_utime_omit_ok`` makes
    libfuse2 pass UTIME_OMIT/UTIME_NOW on (without it, setting one timestamp, e.g. ``touch -m``, is
    silently dropped); libfuse3 always does.
    """

    flag_utime_omit_ok = True

    def __call__(self, op: str, *args: Any) -> Any:
        return getattr(self, op)(*args)


def fuse_kwargs(config: MountConfig) -> dict[str, Any]:
    """FUSE() keyword arguments: the common subset of both bindings and libfuse 2/3."""
    kwargs: dict[str, Any] = {
        "foreground": True,  # never let libfuse fork: Python threads and state do not survive it
        "raw_fi": True,  # we set fi.direct_io per open
        "auto_unmount": True,  # a daemon that dies leaves no wedged mount
        "use_ino": True,  # backing inode numbers (tar/cp -a hard-link detection)
        "fsname": config.source.replace(",", "_"),  # commas separate -o options
        "subtype": "guestfs",
        "attr_timeout": config.attr_timeout,
        "entry_timeout": config.attr_timeout,
    }
    if config.threads == "single":
        # libfuse's single-threaded loop: no GIL hand-off between C worker threads per request; a
        # 4 KiB read costs ~3x less (docs/benchmarks.md), at the price of no overlap of slow backing I/O
        kwargs["nothreads"] = True
    if config.read_only:
        kwargs["ro"] = True
    for item in config.fuse_options:
        key, has_value, value = item.partition("=")
        kwargs[key] = value if has_value else True
    return kwargs


# -- foreground mount ------------------------------------------------------------------------------


def mount(config: MountConfig) -> int:
    """Serve ``config.source`` at ``config.mountpoint`` until unmounted or signalled; returns 0."""
    from guestfs.filekey import key_for_fd, key_for_path
    from guestfs.stack import build_stack
    from guestfs.transport import ServerUnreachable

    binding = load_binding(config.binding)
    # The kernel has already applied the caller's umask to the modes of create/mkdir/mknod; the daemon's
    # own umask must not narrow them again (libfuse's passthrough example does the same).
    os.umask(0)
    try:
        stack = build_stack(config.stack_config())  # fallible setup happens before FUSE() (see fuse-notes §1.5)
    except ServerUnreachable as exc:
        raise MountError(str(exc)) from exc
    mount_info = {"binding": config.binding, "libfuse": libfuse_major(binding), "source": config.source,
                  "pid": os.getpid(), "threads": config.threads, "attr_timeout": config.attr_timeout}
    ops_class = _FusepyOps if config.binding == "fusepy" else Ops
    ops = ops_class(config.source, stack.pageio, key_for_fd=key_for_fd, key_for_path=key_for_path,
                    stats=lambda: {**stack.stats(), "mount": mount_info})
    _log.info("mounting %s on %s (%s, libfuse%d, tmem client %d, cache mode after init: %s%s)", config.source,
              config.mountpoint, config.binding, libfuse_major(binding), stack.client_id, stack.cleancache.mode,
              f": {stack.cleancache.disabled_reason}" if stack.cleancache.disabled_reason else "")
    try:
        _fuse_class(binding)(ops, config.mountpoint, **fuse_kwargs(config))
    except RuntimeError as exc:
        if exc.args != (LIBFUSE3_SIGNAL_EXIT,):
            raise MountError(f"libfuse could not serve {config.mountpoint} (fuse_main returned {exc.args[0]}); "
                             "see its messages above") from exc
        _log.info("stopped by a signal; libfuse unmounted %s", config.mountpoint)
    finally:
        stack.close()
    _log.info("unmounted %s", config.mountpoint)
    return 0


# -- background mount --------------------------------------------------------------------------------


@dataclass
class MountHandle:
    """A guestfs daemon running in a subprocess, and where it is mounted."""

    mountpoint: str
    process: subprocess.Popen[bytes]
    log_path: str

    def stats(self) -> dict[str, Any]:
        return read_stats(self.mountpoint)

    def unmount(self, timeout: float = 10.0) -> None:
        """Unmount, wait for the daemon to exit (terminate/kill after ``timeout``), never leave a mount."""
        if is_fuse_mount(self.mountpoint):
            try:
                unmount(self.mountpoint, timeout=timeout)
            except MountError as exc:
                _log.warning("unmount of %s failed (%s); stopping the daemon instead", self.mountpoint, exc)
        _stop_process(self.process, timeout)
        if is_fuse_mount(self.mountpoint):  # the daemon died without auto_unmount finishing: detach
            unmount(self.mountpoint, timeout=timeout, lazy=True)

    def __enter__(self) -> MountHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.unmount()


def start_mount(source: str, mountpoint: str, args: list[str], timeout: float = 10.0,
                log_path: str | None = None) -> MountHandle:
    """Run ``python -m guestfs mount -f SOURCE MOUNTPOINT *args`` detached; return once live.

    Raises MountError (with the daemon's last log line) if it exits or is not live within ``timeout``,
    and ValueError for a ``timeout`` that is not a finite number > 0 (NaN would never expire).
    """
    if not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
    log_path = log_path or default_log_path(mountpoint)
    # -P: no current directory on sys.path, so a ./guestfs package where the user stands can never run
    # as the (root) daemon; _child_env puts this very package first instead.
    command = [sys.executable, "-P", "-m", "guestfs", "mount", "-f", source, mountpoint, *args]
    try:
        log = open(log_path, "ab")
    except OSError as exc:
        raise MountError(f"cannot write the log file {log_path}: {exc.strerror}") from None
    with log:
        log_start = log.tell()  # the log is appended to across mounts: report only this daemon's lines
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, env=_child_env())
    handle = MountHandle(os.path.abspath(mountpoint), process, log_path)
    try:
        wait_until_live(handle.mountpoint, process, log_path, timeout, log_start)
    except BaseException:
        handle.unmount(timeout=timeout)
        raise
    return handle


def wait_until_live(mountpoint: str, process: subprocess.Popen[bytes], log_path: str, timeout: float,
                    log_start: int = 0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = process.poll()
        if status is not None:
            raise MountError(f"guestfs daemon exited with status {status}: {last_error_line(log_path, log_start)}")
        if is_live(mountpoint):
            return
        time.sleep(POLL_INTERVAL)
    raise MountError(f"mount not live after {timeout:g}s: {last_error_line(log_path, log_start)} (log: {log_path})")


def is_live(mountpoint: str) -> bool:
    """A FUSE mount is listed AND answers a stat (a dead daemon's mount is listed but fails)."""
    if not is_fuse_mount(mountpoint):
        return False
    try:
        os.stat(mountpoint)
    except OSError:
        return False
    return True


def default_log_path(mountpoint: str) -> str:
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / f"guestfs-{os.getuid()}"
    base.mkdir(mode=0o700, exist_ok=True)
    name = os.path.abspath(mountpoint).strip("/").replace("/", "_") or "root"
    return str(base / f"{name}.log")


def last_error_line(log_path: str, start: int = 0) -> str:
    """The most telling line of a daemon log from byte ``start``: libfuse's own message, else the last
    error-looking line, else the last line."""
    try:
        with open(log_path, "rb") as log:
            log.seek(start)
            text = log.read().decode(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    from_libfuse = [line for line in lines if line.startswith(("fuse:", "fusermount"))]
    errors = [line for line in lines if "error" in line.lower() or line.startswith("guestfs mount:")]
    return (from_libfuse or errors or lines or ["(empty log)"])[-1]


def _child_env() -> dict[str, str]:
    """Make sure the child imports this very guestfs package, whatever its cwd and sys.path."""
    env = dict(os.environ)
    package_parent = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    return env


def _stop_process(process: subprocess.Popen[bytes], timeout: float) -> None:
    try:
        process.wait(timeout=timeout)
        return
    except subprocess.TimeoutExpired:
        process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)


# -- unmount and stats ---------------------------------------------------------------------------------


def unmount(mountpoint: str, timeout: float = 10.0, lazy: bool = False) -> None:
    """Unmount a FUSE mount: fusermount3 -u, then fusermount -u, then umount; wait until it is gone."""
    lazy_flag = ["-z"] if lazy else []
    commands = [["fusermount3", "-u", *lazy_flag], ["fusermount", "-u", *lazy_flag],
                ["umount", *(["-l"] if lazy else [])]]
    failure = "no unmount command available"
    for command in commands:
        try:
            result = subprocess.run([*command, mountpoint], capture_output=True, text=True, timeout=timeout)
        except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
            failure = f"{command[0]}: {exc}"
            continue
        if result.returncode == 0:
            _wait_until_unmounted(mountpoint, timeout)
            return
        failure = (result.stderr.strip().splitlines() or [f"{command[0]} exited {result.returncode}"])[-1]
    raise MountError(f"cannot unmount {mountpoint}: {failure}")


def _wait_until_unmounted(mountpoint: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while is_fuse_mount(mountpoint):
        if time.monotonic() > deadline:
            raise MountError(f"{mountpoint} still mounted {timeout:g}s after unmount")
        time.sleep(POLL_INTERVAL)


def read_stats(mountpoint: str) -> dict[str, Any]:
    """The daemon's ``Stack.stats()`` (plus mount info) via the root's virtual xattr."""
    try:
        raw = os.getxattr(mountpoint, STATS_XATTR)
    except OSError as exc:
        raise MountError(f"{mountpoint} is not a live guestfs mount: {exc.strerror}") from exc
    return dict(json.loads(raw))
