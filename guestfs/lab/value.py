"""The value table: what tmem buys a guest whose disk is read without a host cache (issue 9).

Setup, as a VM with ``cache=none`` on a Xen-like host:

* the disk: an ext4 image on a loop device with ``losetup --direct-io=on`` (the loop device reads
  its image with O_DIRECT, so the host page cache never holds the image), mounted in a temp dir;
  the working set (``working_set_factor`` x the guest memory, in ``files`` files) is written on
  it, every page derived from (file, index) so the reader checks it without a second read;
* the guest: a memory cgroup of ``guest_memory`` bytes (``guestmem``) that the reader process
  (``reader.py``) runs in; the kernel page cache it fills is charged to it;
* the host: the guestfs daemon (``--backing-direct``: misses read the ext4 files with O_DIRECT)
  and tmemd (``--memory`` = the row's tmem size) run outside the cgroup.

Rows, all reading the same seeded zipf sequence (``live.plan_reads``) in a fresh cgroup of the
same size, each starting cold (the files' and the device's cached pages dropped with
POSIX_FADV_DONTNEED and checked with mincore):

* ``tmem 0``, ``tmem 1x``, ``tmem 2x``, ``tmem 4x``: through a guestfs mount on a tmemd of that
  size (0 is a one-page tmemd: the mount needs a host, and this one keeps nothing);
* ``O_DIRECT``: the reader opens the ext4 files with O_DIRECT, no FUSE, no cache at all;
* ``bindfs``: through bindfs over the ext4 mount, whose speed comes from the host page cache
  (the double caching tmem replaces).

The reader first makes one sequential pass over the working set (``warmup``: a guest that has
run a while has read its data before; without it most of a short run's misses are first
touches, which no cache can serve), then the lab samples the counters and the reader runs the
timed zipf reads. Measured per row, for the timed reads: the reader's wall time (timed by
itself; ``warm_seconds`` is their second half, ``warmup_seconds`` the pass before), bytes the
loop device read (``/sys/block/loopN/stat``), bytes guestfs read from the backing files, the
tmem hit ratio (successful gets / gets: the share of the guest's page-cache misses tmem
served), and the host memory the row used at its end: tmemd's resident-set growth since before
the mount (its whole cost, Python's per-page overhead included; tmemd's own count of the pages
it holds is ``tmem_held_bytes``) plus the host page cache of the working-set files (mincore;
what bindfs lives on).

``value_table()`` runs it (``guestfs lab live --value-table``, ``make demo`` with small sizes,
benchmarks); ``value_targets()`` checks the issue's targets on its rows; ``write_value_outputs()``
writes CSV/JSON/plots/summary; ``value_latencies()`` measures each layer's cost per read (where
the time goes).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import guestmem, plots, reader, report

PAGE_BYTES = reader.PAGE_BYTES
COMMAND_TIMEOUT = 60.0
POLL_INTERVAL = 0.02
READER_SCRIPT = str(Path(reader.__file__).resolve())
DEFAULT_GUEST_MEMORY = 16 << 20  # the whole table in ~30-60 s here (docs: the measured run)
DEFAULT_TMEM_FACTORS = (0, 1, 2, 4)
VALUE_FILES = 8


class ValueTableError(RuntimeError):
    """The table cannot be run here or a part of it failed; the message is one line."""


# -- the slow disk: ext4 on a direct-io loop device ----------------------------------------------


@dataclass(frozen=True)
class LoopDisk:
    """A mounted ext4 image on a loop device; ``direct_io`` as the kernel reports it."""

    image: Path
    device: str
    mountpoint: Path
    direct_io: bool

    def read_bytes(self) -> int:
        """Bytes the loop device has read since it was set up (its stat's sectors read x 512)."""
        fields = Path(f"/sys/block/{Path(self.device).name}/stat").read_text().split()
        return int(fields[2]) * 512


def loop_disk_unavailable_reason() -> str | None:
    """Why an ext4 loop disk cannot be made here (one line), or None when it can."""
    if os.geteuid() != 0:
        return "needs root (losetup and mount)"
    for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} not found (install util-linux / e2fsprogs)"
    if not Path("/dev/loop-control").exists():
        return "no /dev/loop-control (loop devices unavailable)"
    return None


@contextmanager
def ext4_loop_disk(workdir: Path, size_bytes: int) -> Iterator[LoopDisk]:
    """Make an ext4 image in ``workdir``, attach it with --direct-io=on, mount it; always undone."""
    reason = loop_disk_unavailable_reason()
    if reason is not None:
        raise ValueTableError(f"loop disk unavailable: {reason}")
    image = workdir / "disk.ext4"
    mountpoint = workdir / "disk"
    mountpoint.mkdir()
    with open(image, "wb") as out:
        out.truncate(size_bytes)  # sparse
    _run(["mkfs.ext4", "-q", "-F", str(image)])
    device = ""
    mounted = False
    try:
        device = _run(["losetup", "--find", "--show", "--direct-io=on", str(image)]).stdout.strip()
        _run(["mount", "-t", "ext4", "-o", "noatime", device, str(mountpoint)])
        mounted = True
        dio = Path(f"/sys/block/{Path(device).name}/loop/dio").read_text().strip() == "1"
        yield LoopDisk(image, device, mountpoint, dio)
    finally:
        _undo([["umount", str(mountpoint)]] * mounted + [["losetup", "-d", device]] * bool(device))


def _undo(commands: list[list[str]]) -> None:
    """Run every teardown command even if one fails; then raise the first failure."""
    failures = []
    for argv in commands:
        try:
            _run(argv)
        except ValueTableError as exc:
            failures.append(exc)
    if failures:
        raise failures[0]


def write_working_set(root: Path, files: int, pages_per_file: int) -> list[str]:
    """``files`` files of ``pages_per_file`` derived pages each (``reader.page_bytes``), fsynced."""
    names = []
    for file_no in range(files):
        name = f"ws{file_no:03d}.dat"
        with open(root / name, "wb") as out:
            for start in range(0, pages_per_file, 256):  # 1 MiB per write
                out.write(b"".join(reader.page_bytes(file_no, index)
                                   for index in range(start, min(start + 256, pages_per_file))))
            out.flush()
            os.fsync(out.fileno())
        names.append(name)
    return names


# -- cold starts: dropping and counting cached pages ---------------------------------------------


def drop_cached(paths: Sequence[Path | str]) -> None:
    """Ask the kernel to drop the cached pages of ``paths`` (files or block devices; all clean)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value


def resident_bytes(path: Path | str) -> int:
    """Bytes of ``path`` in the page cache now (mincore over a mapping that faults nothing in)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        length = os.fstat(fd).st_size
        if length == 0:
            return 0
        address = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address == _MAP_FAILED:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(path))
        try:
            pages = -(-length // PAGE_BYTES)
            vector = (ctypes.c_ubyte * pages)()
            if _libc.mincore(address, length, vector) != 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(path))
            return sum(1 for flag in bytes(vector) if flag & 1) * PAGE_BYTES
        finally:
            _libc.munmap(address, length)
    finally:
        os.close(fd)


def resident_total(paths: Sequence[Path]) -> int:
    return sum(resident_bytes(path) for path in paths)


# -- host side: tmemd and bindfs ----------------------------------------------------------------


@dataclass
class Tmemd:
    """A tmemd we started: its address and process."""

    address: str
    process: subprocess.Popen[bytes]

    def rss_bytes(self) -> int:
        """tmemd's resident set now (VmRSS of /proc/PID/status)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise ValueTableError(f"tmemd (pid {self.process.pid}) has no VmRSS")

    def global_stats(self) -> dict[str, int]:
        """tmemd's global counters (``tmemctl --server ADDR list --long``: its G= line, by Xen's names)."""
        from tmemcore.stats import GLOBAL_LONG, GLOBAL_SHORT

        done = subprocess.run([sys.executable, "-P", "-m", "tmemcore.cli", "--server", self.address, "list", "--long"],
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
        line = next((text for text in done.stdout.splitlines() if text.startswith("G=")), None)
        if done.returncode != 0 or line is None:
            raise ValueTableError(f"tmemctl list failed: {(done.stderr.strip().splitlines() or ['no G= line'])[-1]}")
        names = dict(GLOBAL_SHORT + GLOBAL_LONG)
        pairs = (item.split(":", 1) for item in line[2:].split(","))
        return {names.get(key, key): int(value) for key, value in pairs}


@contextmanager
def tmemd_daemon(workdir: Path, memory_bytes: int, *, timeout: float = 15.0) -> Iterator[Tmemd]:
    """Run tmemd on a unix socket in ``workdir`` with a ``memory_bytes`` budget; always stopped."""
    socket_path, ready = workdir / "tmemd.sock", workdir / "tmemd.ready"
    ready.unlink(missing_ok=True)
    log = open(workdir / "tmemd.log", "ab")
    with log:
        process = subprocess.Popen([sys.executable, "-P", "-m", "tmemcore.server", "--listen", f"unix:{socket_path}",
                                    "--memory", str(memory_bytes), "--ready-file", str(ready),
                                    "--log-level", "WARNING"],
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=_child_env())
    try:
        deadline = time.monotonic() + timeout
        while not (ready.exists() and ready.read_text().strip()):
            if process.poll() is not None:
                raise ValueTableError(f"tmemd exited with status {process.returncode}: "
                                      f"{_last_line(workdir / 'tmemd.log')}")
            if time.monotonic() > deadline:
                raise ValueTableError(f"tmemd not listening after {timeout:g} s")
            time.sleep(POLL_INTERVAL)
        yield Tmemd(ready.read_text().strip(), process)
    finally:
        _stop(process, timeout)


@contextmanager
def bindfs_mount(source: Path, mountpoint: Path, *, timeout: float = 15.0) -> Iterator[Path]:
    """bindfs in the foreground (our child) over ``source``; unmounted and waited for on leaving."""
    from guestfs.mount import is_live, unmount

    if shutil.which("bindfs") is None:
        raise ValueTableError("bindfs is not installed (apt-get install bindfs)")
    mountpoint.mkdir(exist_ok=True)
    process = subprocess.Popen(["bindfs", "-f", str(source), str(mountpoint)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while not is_live(str(mountpoint)):
            if process.poll() is not None:
                raise ValueTableError(f"bindfs exited with status {process.returncode}: "
                                      f"{(process.stderr.read().decode().strip().splitlines() or ['?'])[-1]}")  # type: ignore[union-attr]
            if time.monotonic() > deadline:
                raise ValueTableError(f"bindfs mount not live after {timeout:g} s")
            time.sleep(POLL_INTERVAL)
        yield mountpoint
    finally:
        if is_live(str(mountpoint)):
            unmount(str(mountpoint), timeout=timeout)
        _stop(process, timeout)


def _stop(process: subprocess.Popen[bytes], timeout: float) -> None:
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)
    if process.stderr is not None:
        process.stderr.close()


# -- the rows ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValueSettings:
    """Everything that shapes the table (``value_table``'s keyword arguments)."""

    guest_memory: int = DEFAULT_GUEST_MEMORY
    working_set_factor: int = 4
    tmem_factors: tuple[float, ...] = DEFAULT_TMEM_FACTORS
    reads: int | None = None  # None: READS_PER_PAGE reads per working-set page
    alpha: float = 0.9
    seed: int = 1
    files: int = VALUE_FILES
    first_chance: str = "kernel"
    backing_direct: bool = True
    threads: str = "single"
    baselines: bool = True
    warmup: bool = True
    reader_timeout: float = 300.0

    @property
    def working_set_bytes(self) -> int:
        return self.guest_memory * self.working_set_factor

    @property
    def pages_per_file(self) -> int:
        return max(1, self.working_set_bytes // PAGE_BYTES // self.files)

    @property
    def read_count(self) -> int:
        return self.reads if self.reads is not None else READS_PER_PAGE * self.pages_per_file * self.files


READS_PER_PAGE = 2


@dataclass
class _Disk:
    """The mounted disk, its files and the shared sequence: what every row reads."""

    disk: LoopDisk
    files: list[str]
    spec: dict[str, Any]
    scratch: Path

    @property
    def paths(self) -> list[Path]:
        return [self.disk.mountpoint / name for name in self.files]

    def cold(self) -> int:
        """Drop the files' and the device's cached pages; returns the files' bytes still resident."""
        drop_cached([*self.paths, self.disk.device, self.disk.image])
        return resident_total(self.paths)


Counters = Callable[[], dict[str, int]]


def _no_counters() -> dict[str, int]:
    return {}


def _read_in_guest(disk: _Disk, settings: ValueSettings, root: Path, direct: bool,
                   counters: Counters = _no_counters) -> dict[str, Any]:
    """Run the reader over ``root`` in a fresh guest cgroup; its result, the cgroup's usage, and
    ``counters()`` plus the loop device's bytes read, sampled before the reader starts
    (``counters_start``), after its warm-up (``counters_warm``) and after its timed reads
    (``counters_end``), while the mounts still exist (host-side counters vanish at unmount)."""
    spec = {**disk.spec, "root": str(root), "direct": direct, "warmup": settings.warmup}
    spec_path = reader.write_spec(str(disk.scratch / "spec.json"), spec)

    def sample() -> dict[str, int]:
        return {"device_bytes_read": disk.disk.read_bytes(), **counters()}

    # -S: no site-packages: the derived check needs only the standard library, and every MiB
    # the interpreter does not take stays guest page cache
    argv = [sys.executable, "-I", "-S", READER_SCRIPT, spec_path]
    with guestmem.guest_memory(settings.guest_memory) as cgroup:
        start = sample()
        warm, result, at_warm = _reader_session(cgroup, argv, settings.reader_timeout, settings.warmup, sample)
        if not result["memory_cgroup"].endswith("/" + cgroup.path.name):
            raise ValueTableError(f"the reader ran in {result['memory_cgroup']!r}, not in {cgroup.path}")
        end = sample()
        usage = cgroup.usage()
    result["warm_seconds"] = _second_half(result)
    return {**result, "warmup": warm, "guest": usage.to_dict(), "counters_start": start,
            "counters_warm": at_warm or start, "counters_end": end}


def _reader_session(cgroup: guestmem.MemoryCgroup, argv: list[str], timeout: float, warmup: bool,
                    sample: Counters) -> tuple[dict[str, Any] | None, dict[str, Any], dict[str, int] | None]:
    """Run the reader: (its warm-up line, its timed result, ``sample()`` between the two)."""
    import json

    deadline = time.monotonic() + timeout
    process = guestmem.spawn_in_cgroup(cgroup, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE)
    try:
        warm = at_warm = None
        if warmup:
            warm = json.loads(_line_before(process, deadline))
            at_warm = sample()
            process.stdin.write(b"go\n")  # type: ignore[union-attr]
            process.stdin.flush()  # type: ignore[union-attr]
        stdout, stderr = process.communicate(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise ValueTableError(f"the reader did not finish within {timeout:g} s (killed)") from None
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    if process.returncode != 0:
        if process.returncode == -signal.SIGKILL and cgroup.usage().oom_kills:
            raise ValueTableError(f"the reader was killed by the OOM killer of the {cgroup.limit_bytes >> 20} MiB "
                                  "guest: its own memory does not fit")
        raise ValueTableError(f"reader failed ({process.returncode}): "
                              f"{(stderr.decode().strip().splitlines() or ['?'])[-1]}")
    return warm, json.loads(stdout.decode().strip().splitlines()[-1]), at_warm


def _line_before(process: subprocess.Popen[bytes], deadline: float) -> str:
    """The next line the process writes, waiting until ``deadline`` at most."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], max(0.0, deadline - time.monotonic()))
    if not ready:
        raise subprocess.TimeoutExpired(process.args, 0)
    line = process.stdout.readline()
    if not line:  # the reader ended before its warm-up line: its stderr says why
        process.wait()
        stderr = process.stderr.read().decode() if process.stderr else ""
        raise ValueTableError(f"reader failed ({process.returncode}): {(stderr.strip().splitlines() or ['?'])[-1]}")
    return line.decode()


def _second_half(result: dict[str, Any]) -> float:
    """Seconds of the timed reads' second half (from the reader's checkpoints)."""
    marks = result["checkpoints"]
    half = len(marks) // 2
    return float(marks[-1] - marks[half - 1]) if half >= 1 else float(result["seconds"])


def _phase(run: dict[str, Any], name: str) -> int:
    """Counter ``name`` during the timed reads (end - after warm-up)."""
    return run["counters_end"].get(name, 0) - run["counters_warm"].get(name, 0)


def _warm_phase(run: dict[str, Any], name: str) -> int:
    return run["counters_warm"].get(name, 0) - run["counters_start"].get(name, 0)


def _common(run: dict[str, Any], resident_before: int, host_cache: int) -> dict[str, Any]:
    """The fields every row has, timed-phase counters included."""
    warm = run["warmup"] or {}
    return {**{k: v for k, v in run.items() if not k.startswith("counters_")}, "counters": {
                "start": run["counters_start"], "warm": run["counters_warm"], "end": run["counters_end"]},
            "warmup_seconds": warm.get("seconds", 0.0),
            "warmup_wrong_reads": warm.get("wrong_reads", 0),
            "device_bytes_read": _phase(run, "device_bytes_read"),
            "warmup_device_bytes_read": _warm_phase(run, "device_bytes_read"),
            "resident_before_bytes": resident_before, "host_page_cache_bytes": host_cache}


def _guestfs_row(disk: _Disk, settings: ValueSettings, factor: float) -> dict[str, Any]:
    from guestfs.mount import start_mount
    from guestfs.pageio import wait_until_cacheable

    tmem_bytes = int(factor * settings.guest_memory) // PAGE_BYTES * PAGE_BYTES
    resident_before = disk.cold()
    # files changed within the last second are served but not cached: let the new files settle
    wait_until_cacheable(*disk.paths)
    mountpoint = disk.scratch / "mnt"
    mountpoint.mkdir(exist_ok=True)
    with tmemd_daemon(disk.scratch, max(tmem_bytes, PAGE_BYTES)) as tmemd:
        rss_before = tmemd.rss_bytes()
        handle = start_mount(str(disk.disk.mountpoint), str(mountpoint), guestfs_mount_args(settings, tmemd.address),
                             timeout=15.0, log_path=str(disk.scratch / "guestfs.log"))
        try:
            def counters() -> dict[str, int]:
                stats = handle.stats()
                counts = {name: int(stats.get(name, 0)) for name in GUESTFS_COUNTERS}
                return {**counts, "tmemd_rss_bytes": tmemd.rss_bytes()}

            run = _read_in_guest(disk, settings, mountpoint, False, counters)
            held = tmemd.global_stats()
            backing_direct = handle.stats().get("backing_direct", 0) == 1
        finally:
            handle.unmount(timeout=15.0)
    row = _common(run, resident_before, resident_total(disk.paths))
    hits, misses = _phase(run, "succ_gets"), _phase(run, "failed_gets")
    rss_growth = run["counters_end"]["tmemd_rss_bytes"] - rss_before
    return {**row, "row": f"tmem {factor:g}x" if factor else "tmem 0", "kind": "guestfs", "tmem_factor": factor,
            "tmem_bytes": tmem_bytes, "backing_bytes_read": _phase(run, "backing_bytes_read"),
            "warmup_backing_bytes_read": _warm_phase(run, "backing_bytes_read"),
            "fuse_reads": _phase(run, "reads"), "succ_gets": hits, "failed_gets": misses, "puts": _phase(run, "puts"),
            "tmem_hit_ratio": hits / (hits + misses) if hits + misses else 0.0,
            "tmemd_rss_growth_bytes": rss_growth, "tmem_held_bytes": held.get("global_page_count", 0) * PAGE_BYTES,
            "tmem_evicted_pages": held.get("evicted_pgs", 0),
            "host_memory_bytes": max(0, rss_growth) + row["host_page_cache_bytes"],
            "backing_direct": backing_direct, "first_chance": settings.first_chance, "threads": settings.threads}


GUESTFS_COUNTERS = ("reads", "succ_gets", "failed_gets", "puts", "backing_bytes_read", "backing_reads")


def guestfs_mount_args(settings: ValueSettings, server: str) -> list[str]:
    """The guestfs mount options of a tmem row (daemon first chance: its cache as big as the guest)."""
    args = ["--first-chance", settings.first_chance, "--server", server, "--threads", settings.threads]
    if settings.first_chance == "daemon":  # the guest's first chance, but in the daemon (outside the cgroup)
        args += ["--page-cache", str(settings.guest_memory)]
    return args + (["--backing-direct"] if settings.backing_direct else [])


def _direct_row(disk: _Disk, settings: ValueSettings) -> dict[str, Any]:
    resident_before = disk.cold()
    run = _read_in_guest(disk, settings, disk.disk.mountpoint, True)
    row = _common(run, resident_before, resident_total(disk.paths))
    return {**row, "row": "O_DIRECT", "kind": "direct", "backing_bytes_read": row["device_bytes_read"],
            "host_memory_bytes": row["host_page_cache_bytes"]}


def _bindfs_row(disk: _Disk, settings: ValueSettings) -> dict[str, Any]:
    resident_before = disk.cold()
    mountpoint = disk.scratch / "bindfs"
    mountpoint.mkdir(exist_ok=True)
    with bindfs_mount(disk.disk.mountpoint, mountpoint):
        run = _read_in_guest(disk, settings, mountpoint, False)
    row = _common(run, resident_before, resident_total(disk.paths))  # bindfs reads buffered: the host kept them
    disk.cold()
    return {**row, "row": "bindfs", "kind": "bindfs", "backing_bytes_read": row["device_bytes_read"],
            "host_memory_bytes": row["host_page_cache_bytes"]}


def value_table_unavailable_reason() -> str | None:
    """Why the value table cannot run here (one line), or None: root, loop devices, cgroups, FUSE."""
    reason = loop_disk_unavailable_reason() or guestmem.guest_memory_unavailable_reason()
    if reason is None and not os.path.exists("/dev/fuse"):
        reason = "/dev/fuse is missing"
    return reason


def value_table(
    guest_memory: int = DEFAULT_GUEST_MEMORY,
    *,
    working_set_factor: int = 4,
    tmem_factors: Sequence[float] = DEFAULT_TMEM_FACTORS,
    reads: int | None = None,
    alpha: float = 0.9,
    seed: int = 1,
    files: int = VALUE_FILES,
    first_chance: str = "kernel",
    backing_direct: bool = True,
    threads: str = "single",
    baselines: bool = True,
    warmup: bool = True,
    workdir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the value table; returns ``{"settings", "disk", "distinct_pages", "rows"}`` (rows: dicts).

    ``guest_memory`` bytes of cgroup memory; a working set of ``working_set_factor`` x that in
    ``files`` files; ``reads`` timed 4 KiB zipf(``alpha``) reads (default ``READS_PER_PAGE`` per
    working-set page), after a sequential pass over the working set when ``warmup``; one guestfs
    row per tmem size ``factor x guest_memory`` (0: a one-page tmemd), then, with ``baselines``,
    the O_DIRECT and bindfs rows. ``workdir``: where the temp dir with the image goes (default:
    the system's). Raises ValueTableError (one line) when a part cannot run, ValueError for bad
    settings; the loop device, mounts, cgroups and daemons are always removed.
    """
    from .live import plan_reads

    settings = ValueSettings(guest_memory, working_set_factor, tuple(tmem_factors), reads, alpha, seed, files,
                             first_chance, backing_direct, threads, baselines, warmup)
    _check_settings(settings)
    reason = value_table_unavailable_reason()
    if reason is not None:  # before any image is made: one line that says what is missing
        raise ValueTableError(f"the value table cannot run here: {reason}")
    note = progress or (lambda _message: None)
    with scratch_dir(workdir) as scratch:
        image_bytes = settings.working_set_bytes + settings.working_set_bytes // 8 + (32 << 20)  # ext4's own room
        with ext4_loop_disk(scratch, image_bytes) as loop:
            names = write_working_set(loop.mountpoint, settings.files, settings.pages_per_file)
            plan = plan_reads(loop.mountpoint, settings.read_count, alpha=alpha, seed=seed)
            assert plan.files == names, "plan_reads lists the working-set files in their order"
            sequence = reader.write_sequence(str(scratch / "sequence.bin"), plan.reads)
            disk = _Disk(loop, names, {"files": names, "sequence": sequence, "check": "derived"}, scratch)
            rows = []
            for factor in settings.tmem_factors:
                note(f"tmem {factor:g}x" if factor else "tmem 0")
                rows.append(_guestfs_row(disk, settings, factor))
            if baselines:
                note("O_DIRECT")
                rows.append(_direct_row(disk, settings))
                note("bindfs")
                rows.append(_bindfs_row(disk, settings))
            disk_info = {"device": loop.device, "direct_io": loop.direct_io, "image_bytes": image_bytes}
    return {"settings": settings.__dict__ | {"working_set_bytes": settings.working_set_bytes,
                                             "reads": settings.read_count},
            "disk": disk_info, "distinct_pages": plan.distinct_pages, "rows": rows}


@contextmanager
def scratch_dir(workdir: Path | None) -> Iterator[Path]:
    """A temp dir for the image and mountpoints; removed unless something is still mounted in it
    (never delete through a mount that would not go away: the error that left it says why)."""
    scratch = Path(tempfile.mkdtemp(prefix="guestfs-value-", dir=workdir))
    try:
        yield scratch
    finally:
        with open("/proc/mounts") as table:
            mounted = any(line.split()[1].startswith(f"{scratch}/") for line in table)
        if not mounted:
            shutil.rmtree(scratch, ignore_errors=True)


def _check_settings(settings: ValueSettings) -> None:
    if settings.guest_memory < 4 << 20:
        raise ValueError(f"guest memory of {settings.guest_memory} bytes is too small: at least 4 MiB "
                         "(the reader itself needs a few)")
    if settings.working_set_factor < 1 or settings.files < 1:
        raise ValueError("working_set_factor and files must be at least 1")
    if any(factor < 0 for factor in settings.tmem_factors) or not settings.tmem_factors:
        raise ValueError("tmem factors must be one or more numbers >= 0")
    if settings.first_chance not in ("kernel", "daemon") or settings.threads not in ("single", "multi"):
        raise ValueError("first_chance must be kernel or daemon, threads single or multi")


# -- where the time goes: per-read latencies of each layer --------------------------------------


def _timed_preads(path: Path, indexes: Sequence[int], *, direct: bool = False) -> float:
    """Mean microseconds of one 4 KiB pread at each page index (POSIX_FADV_RANDOM: no read-ahead)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        buffer = [memoryview(mmap.mmap(-1, PAGE_BYTES))]
        started = time.perf_counter()
        for index in indexes:
            os.preadv(fd, buffer, index * PAGE_BYTES)
        return (time.perf_counter() - started) / len(indexes) * 1e6
    finally:
        os.close(fd)


def _timed_gets(server: str | None, path: Path, indexes: Sequence[int]) -> float:
    """Mean microseconds of one CleanCache get of a page put before (no FUSE): tmemd's socket round
    trip with ``server``, the in-process host without."""
    from guestfs.filekey import key_for_path
    from guestfs.stack import StackConfig, build_stack

    stack = build_stack(StackConfig(server=server, first_chance="kernel", tmem_pages=4 * len(indexes) + 64))
    try:
        cleancache, key = stack.pageio.cleancache, key_for_path(str(path))
        for index in indexes:
            cleancache.put_page(key, index, reader.page_bytes(0, index))
        started = time.perf_counter()
        for index in indexes:
            if cleancache.get_page(key, index) is None:
                raise ValueTableError(f"latency probe: page {index} was put but not found")
        return (time.perf_counter() - started) / len(indexes) * 1e6
    finally:
        stack.close()


def _drop_page_cache(path: Path) -> None:
    """Drop the kernel's cached pages of one file (of a FUSE mount too: its pages are clean)."""
    drop_cached([path])


def _guestfs_latencies(disk: LoopDisk, path: Path, scratch: Path, indexes: Sequence[int], threads: str,
                       server: Tmemd | None) -> dict[str, float]:
    """A guestfs mount (kernel first chance, O_DIRECT backing): miss, kernel hit, tmem hit."""
    from guestfs.mount import start_mount

    mountpoint = scratch / f"lat-{threads}-{'tmemd' if server else 'embedded'}"
    mountpoint.mkdir()
    host = ["--server", server.address] if server else ["--tmem", f"{4 * len(indexes) + 64}"]
    handle = start_mount(str(disk.mountpoint), str(mountpoint), ["--first-chance", "kernel", "--backing-direct",
                                                                 "--threads", threads, *host], timeout=15.0,
                         log_path=str(scratch / "guestfs-latency.log"))
    try:
        drop_cached([path, disk.device])
        served = mountpoint / path.name
        miss = _timed_preads(served, indexes)  # device read + a failed get + a put per page
        kernel_hit = _timed_preads(served, indexes)  # the guest's own page cache: no FUSE request
        _drop_page_cache(served)
        tmem_hit = _timed_preads(served, indexes)  # a FUSE request answered by a tmem get
    finally:
        handle.unmount(timeout=15.0)
    return {"miss": miss, "kernel_hit": kernel_hit, "tmem_hit": tmem_hit}


def value_latencies(*, pages: int = 4096, reads: int = 2000, seed: int = 1,
                    workdir: Path | None = None) -> dict[str, float]:
    """Microseconds per 4 KiB read of each layer the value table's rows go through (means over
    ``reads`` random pages of one ``pages``-page file on the direct-io loop disk; no cgroup)."""
    import random

    reason = loop_disk_unavailable_reason() or (None if shutil.which("bindfs") else "bindfs is not installed")
    if reason is not None:
        raise ValueTableError(f"the latency profile cannot run here: {reason}")
    from guestfs.pageio import wait_until_cacheable

    indexes = random.Random(seed).sample(range(pages), min(reads, pages))
    found: dict[str, float] = {}
    with scratch_dir(workdir) as scratch, ext4_loop_disk(scratch, pages * PAGE_BYTES * 2 + (32 << 20)) as disk:
        path = disk.mountpoint / write_working_set(disk.mountpoint, 1, pages)[0]
        wait_until_cacheable(path)
        drop_cached([path, disk.device, disk.image])
        _timed_preads(path, indexes, direct=True)  # the first touch of a freshly written image is slower
        found["device O_DIRECT read (no FUSE)"] = _timed_preads(path, indexes, direct=True)
        drop_cached([path])
        _timed_preads(path, indexes)  # fills the host page cache
        found["host page cache read (no FUSE)"] = _timed_preads(path, indexes)
        with bindfs_mount(disk.mountpoint, scratch / "lat-bindfs") as bound:
            _timed_preads(bound / path.name, indexes)  # host page cache and bindfs's guest pages filled
            _drop_page_cache(bound / path.name)
            found["bindfs read from the host page cache"] = _timed_preads(bound / path.name, indexes)
        with tmemd_daemon(scratch, 4 * pages * PAGE_BYTES) as tmemd:
            found["tmemd get round trip (CleanCache over its socket, no FUSE)"] = _timed_gets(
                tmemd.address, path, indexes)
            for threads in ("single", "multi"):
                result = _guestfs_latencies(disk, path, scratch, indexes, threads, tmemd)
                found[f"guestfs miss, tmemd, --threads {threads} (device + get + put)"] = result["miss"]
                found[f"guestfs tmem hit, tmemd, --threads {threads}"] = result["tmem_hit"]
                if threads == "single":
                    found["guestfs kernel page-cache hit (the guest's first chance)"] = result["kernel_hit"]
        found["in-process get (CleanCache on the embedded host, no FUSE)"] = _timed_gets(None, path, indexes)
        result = _guestfs_latencies(disk, path, scratch, indexes, "single", None)
        found["guestfs tmem hit, embedded host (FUSE, no socket)"] = result["tmem_hit"]
    return found


def render_latencies(latencies: dict[str, float]) -> str:
    lines = ["| layer | µs per 4 KiB read |", "|---|---:|"]
    lines += [f"| {name} | {value:,.1f} |" for name, value in latencies.items()]
    return "\n".join(lines) + "\n"


# -- targets and outputs -------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One of the issue's targets, checked on the measured rows."""

    name: str
    holds: bool | None  # None: a row it needs is missing
    detail: str


def value_targets(rows: list[dict[str, Any]], seconds: str = "seconds") -> list[Target]:
    """The issue's targets for the largest tmem row ("tmem 4x") against tmem 0, O_DIRECT and bindfs.

    ``seconds``: "seconds" (the whole sequence) or "warm_seconds" (its second half)."""
    by_row = {row["row"]: row for row in rows}
    tmem_rows = sorted((row for row in rows if row["kind"] == "guestfs"), key=lambda row: row["tmem_factor"])
    best = tmem_rows[-1] if tmem_rows else None
    zero = by_row.get("tmem 0")
    direct, bind = by_row.get("O_DIRECT"), by_row.get("bindfs")
    targets = []

    def speedup(name: str, other: dict[str, Any] | None, factor: float) -> None:
        if best is None or other is None:
            targets.append(Target(name, None, "row missing"))
            return
        ratio = other[seconds] / best[seconds]
        targets.append(Target(name, ratio >= factor, f"{ratio:.2f}x ({other[seconds]:.2f} s / {best[seconds]:.2f} s)"))

    label = best["row"] if best else "tmem"
    speedup(f"{label} >= 3x faster than tmem 0", zero, 3.0)
    speedup(f"{label} >= 3x faster than O_DIRECT", direct, 3.0)
    if best is None or zero is None:
        targets.append(Target("backing bytes cut by at least the tmem hit ratio", None, "row missing"))
    else:
        bound = zero["backing_bytes_read"] * (1 - best["tmem_hit_ratio"])
        targets.append(Target("backing bytes cut by at least the tmem hit ratio", best["backing_bytes_read"] <= bound,
                              f"{_mib(best['backing_bytes_read'])} vs tmem 0's {_mib(zero['backing_bytes_read'])} "
                              f"x (1 - {best['tmem_hit_ratio']:.1%}) = {_mib(bound)}"))
    if best is None or bind is None:
        targets.append(Target(f"{label} within 2x of bindfs's time", None, "row missing"))
        targets.append(Target(f"{label} host memory <= bindfs's page cache", None, "row missing"))
    else:
        ratio = best[seconds] / bind[seconds]
        targets.append(Target(f"{label} within 2x of bindfs's time", ratio <= 2.0,
                              f"{ratio:.2f}x ({best[seconds]:.2f} s vs {bind[seconds]:.2f} s)"))
        targets.append(Target(f"{label} host memory <= bindfs's page cache",
                              best["host_memory_bytes"] <= bind["host_page_cache_bytes"],
                              f"{_mib(best['host_memory_bytes'])} vs {_mib(bind['host_page_cache_bytes'])}"))
    return targets


def _mib(value: float) -> str:
    return f"{value / (1 << 20):,.1f} MiB"


TABLE_COLUMNS = ["row", "seconds", "warm_seconds", "warmup_seconds", "wrong_reads", "device_MiB", "backing_MiB",
                 "tmem_hit_ratio", "host_memory_MiB", "tmemd_rss_growth_MiB", "tmem_held_MiB", "host_page_cache_MiB",
                 "guest_page_cache_MiB", "guest_peak_MiB"]


def flat_rows(table: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat dict per row, sizes in MiB, for CSV and Markdown (counts of the timed reads)."""
    flat = []
    for row in table["rows"]:
        guest = row["guest"]
        flat.append({
            "row": row["row"], "kind": row["kind"], "tmem_bytes": row.get("tmem_bytes", 0), "reads": row["reads"],
            "seconds": row["seconds"], "warm_seconds": row["warm_seconds"], "warmup_seconds": row["warmup_seconds"],
            "wrong_reads": row["wrong_reads"] + row["warmup_wrong_reads"],
            "device_MiB": _mib_value(row["device_bytes_read"]), "backing_MiB": _mib_value(row["backing_bytes_read"]),
            "tmem_hit_ratio": row.get("tmem_hit_ratio"), "succ_gets": row.get("succ_gets"),
            "failed_gets": row.get("failed_gets"), "puts": row.get("puts"), "fuse_reads": row.get("fuse_reads"),
            "host_memory_MiB": _mib_value(row["host_memory_bytes"]),
            "tmemd_rss_growth_MiB": _mib_value(row.get("tmemd_rss_growth_bytes")),
            "tmem_held_MiB": _mib_value(row.get("tmem_held_bytes")),
            "host_page_cache_MiB": _mib_value(row["host_page_cache_bytes"]),
            "guest_page_cache_MiB": _mib_value(guest["file_bytes"]), "guest_peak_MiB": _mib_value(guest["peak_bytes"]),
            "reader_anon_MiB": _mib_value(row.get("anon_bytes")), "guest_limit_hits": guest["limit_hits"],
            "resident_before_bytes": row["resident_before_bytes"],
            "warmup_device_MiB": _mib_value(row["warmup_device_bytes_read"]),
        })
    return flat


def _mib_value(value: int | None) -> float | None:
    return None if value is None else value / (1 << 20)


def _cell(column: str, value: Any) -> str:
    """Markdown cells: seconds with two decimals, MiB with one, the hit ratio in percent."""
    if value is None or value == "":
        return ""
    if column == "tmem_hit_ratio":
        return f"{100 * value:.1f} %"
    if column.endswith("seconds"):
        return f"{value:.2f}"
    if column.endswith("MiB"):
        return f"{value:,.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def render_value_table(table: dict[str, Any]) -> str:
    """The Markdown table, the setup line and the targets (timed reads, and their second half)."""
    settings = table["settings"]
    head = (f"guest memory {settings['guest_memory'] >> 20} MiB (memory cgroup), working set "
            f"{settings['working_set_bytes'] >> 20} MiB in {settings['files']} files on ext4 on "
            f"{table['disk']['device']} (direct-io {'on' if table['disk']['direct_io'] else 'OFF'}); "
            f"{'a sequential warm-up pass (warmup_seconds), then ' if settings['warmup'] else ''}"
            f"{settings['reads']:,} timed zipf({settings['alpha']:g}) 4 KiB reads ({table['distinct_pages']:,} "
            f"distinct pages), seed {settings['seed']}; guestfs --first-chance {settings['first_chance']}"
            f"{' --backing-direct' if settings['backing_direct'] else ''} --threads {settings['threads']}, tmemd "
            "outside the cgroup. Counts (device, backing, hit ratio) are of the timed reads; host memory at their end.")
    rows = [{column: _cell(column, row.get(column)) for column in TABLE_COLUMNS} for row in flat_rows(table)]
    lines = [head, "", report.markdown_table(rows, TABLE_COLUMNS), ""]
    for seconds, title in (("seconds", "timed reads"), ("warm_seconds", "their second half")):
        lines.append(f"Targets ({title}):")
        for target in value_targets(table["rows"], seconds):
            verdict = {True: "holds", False: "DOES NOT HOLD", None: "n/a"}[target.holds]
            lines.append(f"- {target.name}: {verdict}: {target.detail}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_value_outputs(table: dict[str, Any], out: Path, latencies: dict[str, float] | None = None) -> str:
    """value.csv, value.json, value-time.png, value-backing.png, summary.md in ``out`` (with
    ``latencies``, from ``value_latencies``, also in the JSON and the summary); the summary text."""
    rows = flat_rows(table)
    report.write_csv(out / "value.csv", rows)
    report.write_json(out / "value.json", {"meta": report.run_metadata(), **table,
                                           "targets": [t.__dict__ for t in value_targets(table["rows"])],
                                           "targets_warm": [t.__dict__ for t in value_targets(table["rows"],
                                                                                              "warm_seconds")],
                                           "latencies_us": latencies})
    tmem = [row for row in rows if row["kind"] == "guestfs"]
    sizes = [row["tmem_bytes"] / (1 << 20) for row in tmem]
    flat_line = {row["row"]: row for row in rows if row["kind"] != "guestfs"}
    time_curves = {"guestfs + tmem": (sizes, [row["seconds"] for row in tmem])}
    backing_curves = {"guestfs backing reads": (sizes, [row["backing_MiB"] for row in tmem])}
    for name, row in flat_line.items():  # baselines have no tmem: a flat line across the sizes
        time_curves[name] = (sizes, [row["seconds"]] * len(sizes))
        backing_curves[f"{name} device reads"] = (sizes, [row["device_MiB"]] * len(sizes))
    plots.plot_curves(out / "value-time.png", "reader wall time against tmem size", "tmem size (MiB)",
                      time_curves, ylabel="seconds", logx=False, percent=False)
    plots.plot_curves(out / "value-backing.png", "backing MiB read against tmem size", "tmem size (MiB)",
                      backing_curves, ylabel="MiB read", logx=False, percent=False)
    body = render_value_table(table)
    sections = [("Rows", body)]
    if latencies is not None:
        sections.append(("Where the time goes", render_latencies(latencies)))
        body += "\nWhere the time goes (value_latencies):\n\n" + render_latencies(latencies)
    report.write_summary(out / "summary.md", "Value table: tmem vs the host page cache", sections)
    return body


# -- helpers -------------------------------------------------------------------------------------


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a setup command with a bounded timeout; raises ValueTableError with its last line."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise ValueTableError(f"{' '.join(argv)} did not finish within {COMMAND_TIMEOUT:g} s") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise ValueTableError(f"{' '.join(argv)} failed ({done.returncode}): {detail[-1] if detail else ''}")
    return done


def _child_env() -> dict[str, str]:
    """Make the child import this very tmemcore/guestfs, whatever its cwd and sys.path."""
    env = dict(os.environ)
    package_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    return env


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"
