"""Guest memory for lab runs: a memory cgroup of a fixed size that the workload's reader runs in.

A VM's guest has a fixed amount of RAM; its page cache (the first chance) lives inside it, while
tmem lives in the host. Here the "guest" is a memory cgroup: the reader process runs in it, so the
pages the kernel caches for its reads are charged to it and reclaimed at its limit, while the
guestfs daemon, tmemd and bindfs run outside it (as the host's side does).

    with guest_memory(32 << 20) as cgroup:
        done = run_in_cgroup(cgroup, [sys.executable, "reader.py", ...], timeout=60)
        usage = cgroup.usage()      # peak, page cache (file) and anonymous bytes, limit hits

Works with cgroup v2 (``memory.max``, and ``memory.swap.max`` 0) or cgroup v1 (the memory
controller's ``memory.limit_in_bytes``, and ``memory.memsw.limit_in_bytes`` when swap accounting
exists), whichever has the memory controller. Under v1 the cgroup is a child of the caller's own
memory cgroup (the limits of whoever runs us keep applying); under v2, whose processes may live
in leaves only, it is a sibling of the caller's cgroup (or a child of the root). On leaving, any
process still in it is moved back to the caller's cgroup and the directory is removed, polling
with a deadline (a just-exited task can keep it busy for a moment).

``guest_memory_unavailable_reason()`` says in one line why no cgroup can be made here (not root,
no memory controller, a read-only cgroup fs, ...), by trying: it creates and removes a probe.
"""

from __future__ import annotations

import errno
import itertools
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

POLL_INTERVAL = 0.01  # seconds between polls of a cgroup that is still busy
REMOVE_TIMEOUT = 10.0
# Writes its own pid into the cgroup, then becomes the reader: everything the reader ever
# allocates or caches is charged to the cgroup (moving a running process would leave what it
# allocated before the move charged to its old cgroup).
_ENTER_AND_EXEC = 'echo $$ > "$0" && exec "$@"'
_names = itertools.count()


class GuestMemoryError(RuntimeError):
    """A memory cgroup cannot be made, used or removed here; the message is one line."""


@dataclass(frozen=True)
class CgroupPlace:
    """Where our cgroups go: the hierarchy's version, the parent directory, the caller's cgroup."""

    version: int  # 1 or 2
    parent: Path
    home: Path  # the caller's own cgroup: where leftover processes are moved back to


@dataclass(frozen=True)
class MemoryUsage:
    """What the cgroup's processes used: measured by the kernel's memory controller."""

    limit_bytes: int
    peak_bytes: int | None  # None: the kernel keeps no peak (cgroup v2 before 5.19)
    file_bytes: int  # page cache charged to the cgroup: the guest's first chance
    anon_bytes: int  # the reader's own memory
    limit_hits: int  # times the usage reached the limit (v1 failcnt, v2 memory.events max)
    oom_kills: int

    def to_dict(self) -> dict[str, int | None]:
        return {"limit_bytes": self.limit_bytes, "peak_bytes": self.peak_bytes, "file_bytes": self.file_bytes,
                "anon_bytes": self.anon_bytes, "limit_hits": self.limit_hits, "oom_kills": self.oom_kills}


@dataclass(frozen=True)
class MemoryCgroup:
    """A memory cgroup made by ``guest_memory``; valid inside its ``with`` block only."""

    path: Path
    version: int
    limit_bytes: int  # as the kernel took it (rounded down to whole pages)

    @property
    def procs_path(self) -> Path:
        return self.path / "cgroup.procs"

    def pids(self) -> list[int]:
        return [int(line) for line in self.procs_path.read_text().split()]

    def contains(self, pid: int) -> bool:
        return pid in self.pids()

    def usage(self) -> MemoryUsage:
        stat = _read_keyed(self.path / "memory.stat")
        if self.version == 1:
            oom = _read_keyed(self.path / "memory.oom_control")
            return MemoryUsage(self.limit_bytes, _read_int(self.path / "memory.max_usage_in_bytes"),
                               stat.get("cache", 0), stat.get("rss", 0),
                               _read_int(self.path / "memory.failcnt") or 0, oom.get("oom_kill", 0))
        events = _read_keyed(self.path / "memory.events")
        return MemoryUsage(self.limit_bytes, _read_int(self.path / "memory.peak"), stat.get("file", 0),
                           stat.get("anon", 0), events.get("max", 0), events.get("oom_kill", 0))


# -- finding the hierarchy ------------------------------------------------------------------------


def _cgroup_mounts() -> list[tuple[str, Path, set[str]]]:
    """(type, mountpoint, mount options) of every cgroup/cgroup2 mount of this mount namespace."""
    mounts = []
    with open("/proc/self/mounts") as table:
        for line in table:
            fields = line.split()
            if len(fields) >= 4 and fields[2] in ("cgroup", "cgroup2"):
                mounts.append((fields[2], Path(fields[1].replace("\\040", " ")), set(fields[3].split(","))))
    return mounts


def _own_cgroup(version: int) -> str:
    """The caller's cgroup path in the memory hierarchy ("/" when in the root)."""
    with open("/proc/self/cgroup") as table:
        for line in table:
            hierarchy, controllers, path = line.rstrip("\n").split(":", 2)
            if version == 2 and hierarchy == "0" and controllers == "":
                return path
            if version == 1 and "memory" in controllers.split(","):
                return path
    return "/"


def find_cgroup_place() -> CgroupPlace:
    """Where a memory cgroup can be made: v2 when its root offers the memory controller, else v1."""
    mounts = _cgroup_mounts()
    for kind, mountpoint, _ in mounts:
        if kind == "cgroup2" and "memory" in _read_words(mountpoint / "cgroup.controllers"):
            own = mountpoint / _own_cgroup(2).lstrip("/")
            place = (CgroupPlace(2, mountpoint, mountpoint) if not own.is_dir() or own == mountpoint
                     else CgroupPlace(2, own.parent, own))  # v2: no processes in inner nodes, so a sibling
            if "memory" not in _read_words(place.parent / "cgroup.subtree_control"):
                raise GuestMemoryError(f"cgroup v2: the memory controller is not enabled for the children of "
                                       f"{place.parent} (its cgroup.subtree_control)")
            return place
    for kind, mountpoint, options in mounts:
        if kind == "cgroup" and "memory" in options:
            own = mountpoint / _own_cgroup(1).lstrip("/")
            home = own if own.is_dir() else mountpoint
            return CgroupPlace(1, home, home)
    raise GuestMemoryError("no memory cgroup controller is mounted (neither cgroup v2 with memory nor v1 memory)")


def guest_memory_unavailable_reason() -> str | None:
    """Why ``guest_memory`` cannot work here (one line), or None when it can: tries a probe cgroup
    (so a delegated cgroup v2 subtree works without root, and a read-only cgroup fs says so)."""
    try:
        with guest_memory(16 << 20, name=f"guestfs-lab-probe-{os.getpid()}"):
            pass
    except GuestMemoryError as exc:
        return str(exc)
    return None


# -- the cgroup's life ----------------------------------------------------------------------------


@contextmanager
def guest_memory(limit_bytes: int, *, name: str | None = None,
                 remove_timeout: float = REMOVE_TIMEOUT) -> Iterator[MemoryCgroup]:
    """A fresh memory cgroup limited to ``limit_bytes`` (no swap); removed on leaving.

    Raises GuestMemoryError (one line) when it cannot be made or removed.
    """
    if limit_bytes < 4096:
        raise ValueError(f"guest memory must be at least one page (4096 bytes), got {limit_bytes}")
    place = find_cgroup_place()
    path = place.parent / (name or f"guestfs-lab-{os.getpid()}-{next(_names)}")
    try:
        path.mkdir()
    except OSError as exc:
        raise GuestMemoryError(f"cannot create a memory cgroup in {place.parent}: {exc.strerror}") from None
    try:
        cgroup = MemoryCgroup(path, place.version, _set_limit(path, place.version, limit_bytes))
        yield cgroup
    finally:
        _empty_and_remove(path, place.home, remove_timeout)


def _set_limit(path: Path, version: int, limit_bytes: int) -> int:
    """Write the memory limit (and forbid swap where the cgroup can say so); returns what the kernel took."""
    if version == 1:
        limit_file, swap_file, swap_value = "memory.limit_in_bytes", "memory.memsw.limit_in_bytes", limit_bytes
    else:
        limit_file, swap_file, swap_value = "memory.max", "memory.swap.max", 0
    try:
        (path / limit_file).write_text(str(limit_bytes))
        if (path / swap_file).exists():  # without it a full guest would swap instead of dropping its cache
            (path / swap_file).write_text(str(swap_value))
    except OSError as exc:
        raise GuestMemoryError(f"cannot set the memory limit of {path}: {exc.strerror}") from None
    taken = _read_int(path / limit_file)
    if taken is None:  # "max": the write did not take
        raise GuestMemoryError(f"{path / limit_file} did not take the limit {limit_bytes}")
    return taken


def _empty_and_remove(path: Path, home: Path, timeout: float) -> None:
    """Move what is still in the cgroup back to ``home``, then rmdir it, polling until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            for pid in (int(word) for word in (path / "cgroup.procs").read_text().split()):
                _move(pid, home)
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise GuestMemoryError(f"cannot remove the cgroup {path}: {exc.strerror}") from None
        time.sleep(POLL_INTERVAL)


def _move(pid: int, cgroup: Path) -> None:
    try:
        (cgroup / "cgroup.procs").write_text(str(pid))
    except ProcessLookupError:  # exited meanwhile: nothing to move
        pass


# -- running a process in it ----------------------------------------------------------------------


def spawn_in_cgroup(cgroup: MemoryCgroup, argv: Sequence[str], **popen: object) -> subprocess.Popen[bytes]:
    """Start ``argv`` inside ``cgroup``: a shell enters the cgroup, then execs ``argv`` (same pid)."""
    return subprocess.Popen(["/bin/sh", "-c", _ENTER_AND_EXEC, str(cgroup.procs_path), *argv], **popen)  # type: ignore[call-overload]


def run_in_cgroup(cgroup: MemoryCgroup, argv: Sequence[str], *, timeout: float,
                  env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` inside ``cgroup`` to completion (output captured); killed after ``timeout`` s.

    Raises GuestMemoryError (one line) on a timeout, or when the process was killed by the
    cgroup's OOM killer (the guest memory is too small for the reader itself)."""
    process = spawn_in_cgroup(cgroup, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, env=env)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise GuestMemoryError(f"{Path(argv[0]).name} in the cgroup {cgroup.path.name} did not finish "
                               f"within {timeout:g} s (killed)") from None
    if process.returncode == -signal.SIGKILL and cgroup.usage().oom_kills:
        raise GuestMemoryError(f"{Path(argv[-1]).name if argv else '?'} was killed by the OOM killer of a "
                               f"{cgroup.limit_bytes >> 20} MiB guest: its own memory does not fit")
    return subprocess.CompletedProcess(list(argv), process.returncode, stdout, stderr)


# -- reading cgroup files ------------------------------------------------------------------------


def _read_words(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


def _read_int(path: Path) -> int | None:
    """An integer cgroup file; None when it is missing or reads "max" (no limit)."""
    words = _read_words(path)
    if not words or not words[0].isdigit():
        return None
    value = int(words[0])
    return None if value >= 1 << 62 else value  # v1 spells "no limit" as a huge page-rounded number


def _read_keyed(path: Path) -> dict[str, int]:
    """A "key value" per line cgroup file (memory.stat, memory.events, memory.oom_control)."""
    values = {}
    for line in _read_words_lines(path):
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            values[parts[0]] = int(parts[1])
    return values


def _read_words_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError:
        return []
