"""Validated configuration of a guestfs mount: sizes, choices, FUSE options, paths.

Everything a user can get wrong is checked here, before any FUSE or tmem object exists, and every
problem is a ``ValueError`` whose message is one line (the CLI prints it and exits 2).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tmemcore.abi import PAGE_SIZE
from tmemcore.sizes import MAX_SIZE, parse_seconds, parse_size, size_to_pages  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from guestfs.stack import StackConfig

MAX_CLIENT_ID = 0xFFFE  # 0xFFFF is Xen's CLI_ID_NULL (the wire's "assign me one")

ABIS = ("auto", "v1", "v0")
FOLDS = ("xxh64", "ino")
HOST_SPECS = ("auto", "v1", "v0", "both")
BINDINGS = ("mfusepy", "fusepy")
THREADS = ("single", "multi")
FIRST_CHANCES = ("kernel", "daemon")

# -o options a user may pass through to libfuse. Everything else is refused: options such as
# direct_io, kernel_cache or writeback would silently defeat the user-space cache or its accounting,
# and subtype would rename the mount's type, which is how `guestfs umount` recognizes a guestfs mount.
_FLAG_OPTIONS = frozenset({"allow_other", "default_permissions", "noatime", "nodev", "nosuid", "noexec"})
_SECONDS_OPTIONS = frozenset({"entry_timeout", "negative_timeout"})
_VALUE_OPTIONS = frozenset({"fsname"}) | _SECONDS_OPTIONS
MAX_ATTR_TIMEOUT = 3600.0
DEFAULT_PAGE_CACHE_PAGES = 4096  # 16 MiB
PAGE_CACHE_NEEDS_DAEMON = ("--page-cache sizes guestfs's own first-chance cache; with --first-chance kernel the "
                           "kernel's page cache is the first chance (add --first-chance daemon)")
MOUNT_TYPE = "fuse.guestfs"  # the type /proc/mounts lists for every guestfs mount (FUSE subtype "guestfs")

def parse_pages(text: str, what: str) -> int:
    """A size option in pages; at least one page, because a zero-sized cache is a misconfiguration."""
    try:
        pages = size_to_pages(parse_size(text))
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    if pages < 1:
        raise ValueError(f"{what} must be at least 1 byte (sizes are rounded up to whole {PAGE_SIZE}-byte pages), "
                         f"got {text!r}")
    return pages


def parse_fuse_options(values: list[str]) -> tuple[str, ...]:
    """Validate ``-o a,b=c`` passthrough options against the safe list; returns "key" / "key=value" items."""
    items: list[str] = []
    for value in values:
        for item in filter(None, value.split(",")):
            key, has_value, _ = item.partition("=")
            allowed = _VALUE_OPTIONS if has_value else _FLAG_OPTIONS
            if key not in allowed:
                safe = ", ".join(sorted(_FLAG_OPTIONS) + [f"{k}=..." for k in sorted(_VALUE_OPTIONS)])
                raise ValueError(f"-o {item!r} is not a supported FUSE option (supported: {safe})")
            _check_option_value(item)
            items.append(item)
    return tuple(items)


def _check_option_value(item: str) -> None:
    """Refuse what libfuse would only refuse after the daemon started (or silently take, like -1)."""
    key, has_value, value = item.partition("=")
    if not has_value:
        return
    if not value:
        raise ValueError(f"-o {key}= needs a value")
    if key in _SECONDS_OPTIONS:
        parse_seconds(value, f"-o {key}", allow_zero=True)


def _choice(value: str, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(choices)}, got {value!r}")
    return value


@dataclass(frozen=True)
class MountConfig:
    """Everything ``guestfs mount`` needs, already validated (use :meth:`create`)."""

    source: str
    mountpoint: str
    page_cache_pages: int = DEFAULT_PAGE_CACHE_PAGES
    tmem_pages: int = 65536
    abi: str = "auto"
    fold: str = "xxh64"
    compress: bool = False
    read_only: bool = False
    host_spec: str = "auto"
    server: str | None = None
    client_id: int | None = None  # None: 1 on the embedded host, assigned by tmemd with --server
    binding: str = "mfusepy"
    attr_timeout: float = 1.0
    threads: str = "single"
    fuse_options: tuple[str, ...] = field(default_factory=tuple)
    first_chance: str = "kernel"  # kernel: the kernel's page cache | daemon: guestfs's own (direct_io, exact)
    backing_direct: bool = False

    @classmethod
    def create(cls, source: str, mountpoint: str, **options: object) -> MountConfig:
        """Build a config, checking the paths and every option; raises ValueError (one line)."""
        config = cls(source=os.path.abspath(source), mountpoint=os.path.abspath(mountpoint), **options)  # type: ignore[arg-type]
        config.validate()
        return config

    def validate(self) -> None:
        if not os.path.exists(self.source):
            raise ValueError(f"source {self.source} does not exist")
        if not os.path.isdir(self.source):
            raise ValueError(f"source {self.source} is not a directory")
        if is_fuse_mount(self.mountpoint):  # checked first: a wedged mount is not even a directory
            raise ValueError(f"mountpoint {self.mountpoint} is already a FUSE mount (guestfs umount it first)")
        if not os.path.isdir(self.mountpoint):
            raise ValueError(f"mountpoint {self.mountpoint} is not a directory")
        source, mountpoint = os.path.realpath(self.source), os.path.realpath(self.mountpoint)
        if source == mountpoint:
            raise ValueError("source and mountpoint must differ")
        if os.path.commonpath([source, mountpoint]) in (source, mountpoint):
            # the daemon would reach its own mount through the backing path and wait on itself forever
            raise ValueError(f"mountpoint {mountpoint} and source {source} must not contain each other")
        if self.page_cache_pages < 1 or self.tmem_pages < 1:
            raise ValueError("cache sizes must be at least one page")
        _choice(self.abi, ABIS, "--abi")
        _choice(self.fold, FOLDS, "--v0-fold")
        _choice(self.host_spec, HOST_SPECS, "--host-spec")
        _choice(self.binding, BINDINGS, "--fuse")
        _choice(self.threads, THREADS, "--threads")
        _choice(self.first_chance, FIRST_CHANCES, "--first-chance")
        if self.first_chance == "kernel" and self.page_cache_pages != DEFAULT_PAGE_CACHE_PAGES:
            raise ValueError(PAGE_CACHE_NEEDS_DAEMON)
        if not (0.0 <= self.attr_timeout <= MAX_ATTR_TIMEOUT):  # also false for NaN
            raise ValueError(f"--attr-timeout must be between 0 and {MAX_ATTR_TIMEOUT:g} seconds, got {self.attr_timeout:g}")
        if self.client_id is not None and not 1 <= self.client_id <= MAX_CLIENT_ID:
            raise ValueError(f"--client-id must be in 1..{MAX_CLIENT_ID}, got {self.client_id}")
        if self.server is not None:
            self._validate_server()

    def _validate_server(self) -> None:
        assert self.server is not None
        from tmemcore.wire import parse_address  # lazily: only --server needs the wire module

        try:
            parse_address(self.server)
        except ValueError:
            raise ValueError(f"--server must look like tcp:HOST:PORT or unix:PATH, got {self.server!r}") from None
        if self.host_spec != "auto":
            raise ValueError("--host-spec configures the embedded host and cannot be used with --server")
        if self.compress:
            # TMEMC_SET_COMPRESS is a control op: tmemd takes it from client 0 (dom0) only, never a guest
            raise ValueError("--compress needs the embedded host; a tmemd's compression is set by its "
                             "--compress-default")

    def to_args(self) -> list[str]:
        """The ``guestfs mount`` options (without SOURCE/MOUNTPOINT) that recreate this config."""
        args = ["--first-chance", self.first_chance]
        if self.first_chance == "daemon":  # with kernel there is no first-chance cache of ours to size
            args += ["--page-cache", str(self.page_cache_pages * PAGE_SIZE)]
        args += [
            "--abi", self.abi, "--v0-fold", self.fold, "--fuse", self.binding,
            "--attr-timeout", repr(self.attr_timeout), "--threads", self.threads,
        ]
        args += ["--backing-direct"] * self.backing_direct
        if self.server is None:  # the embedded host's options; refused together with --server
            args += ["--tmem", str(self.tmem_pages * PAGE_SIZE), "--host-spec", self.host_spec]
            args += ["--compress"] * self.compress
        else:
            args += ["--server", self.server]
        args += ["--ro"] * self.read_only
        args += ["--client-id", str(self.client_id)] if self.client_id is not None else []
        args += ["-o", ",".join(self.fuse_options)] if self.fuse_options else []
        return args

    def stack_config(self) -> StackConfig:
        from guestfs.stack import StackConfig  # lazy: keeps `guestfs.config` importable on its own

        return StackConfig(
            page_cache_pages=self.page_cache_pages,
            tmem_pages=self.tmem_pages,
            abi=self.abi,
            fold=self.fold,
            compress=self.compress,
            host_spec=self.host_spec,
            server=self.server,
            client_id=self.client_id,
            first_chance=self.first_chance,
            backing_direct=self.backing_direct,
            attr_timeout=self.attr_timeout,
        )


def is_fuse_mount(path: str) -> bool:
    """True when /proc/mounts lists a fuse filesystem at ``path`` (a wedged mount still counts)."""
    return (mount_type(path) or "").startswith("fuse")


def mount_type(path: str) -> str | None:
    """The filesystem type /proc/mounts lists for the topmost mount at ``path`` (``fuse.guestfs``,
    ``tmpfs``, ...), or None when nothing is mounted there.

    Reads /proc/mounts instead of calling stat, which would hang or fail on a wedged mount.
    """
    target = os.path.realpath(path)
    found = None
    try:
        with open("/proc/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) >= 3 and _unescape_mount_path(fields[1]) == target:
                    found = fields[2]  # later lines are mounted on top of earlier ones
    except FileNotFoundError:
        return None
    return found


def _unescape_mount_path(field_text: str) -> str:
    """/proc/mounts escapes space, tab, newline and backslash as octal (\\040 etc.)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_text)
