"""``guestfs`` command line: mount, umount, stats, and the lab/demo entry points.

Exit status: 0 success, 1 runtime failure (mount did not come up, not a guestfs mount), 2 bad usage
(unknown option, bad size, missing source, mountpoint not a directory) -- always one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from guestfs.config import ABIS, BINDINGS, FOLDS, HOST_SPECS, THREADS, MountConfig, parse_fuse_options, parse_pages

DEFAULT_PAGE_CACHE = "16M"
DEFAULT_TMEM = "256M"
DEFAULT_ABI = "auto"
DEFAULT_ATTR_TIMEOUT = 1.0
DEFAULT_MOUNT_TIMEOUT = 10.0

_DELEGATES = {"lab": ("guestfs.lab.cli", "main"), "demo": ("guestfs.demo", "main")}


class UsageError(Exception):
    """Bad command-line input; reported as one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message}")


def _default_binding() -> str:
    return os.environ.get("GUESTFS_FUSE", "mfusepy")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="guestfs", description="FUSE passthrough filesystem with a tmem second-chance page cache.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    mount = commands.add_parser("mount", help="mount SOURCE at MOUNTPOINT (returns once the mount is live)",
                                description="Mount the directory SOURCE at MOUNTPOINT through guestfs. Without -f the "
                                            "daemon runs detached and the command returns once the mount answers.")
    mount.add_argument("source", metavar="SOURCE", help="backing directory")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT", help="empty directory to mount on")
    mount.add_argument("-f", "--foreground", action="store_true",
                       help="serve in the foreground until unmounted or signalled (default: detach)")
    mount.add_argument("--page-cache", metavar="SIZE", default=DEFAULT_PAGE_CACHE,
                       help="first-chance page cache size, K/M/G suffixes or bytes, rounded up to 4 KiB pages "
                            f"(default: {DEFAULT_PAGE_CACHE})")
    mount.add_argument("--tmem", metavar="SIZE", default=DEFAULT_TMEM,
                       help=f"memory budget of the embedded tmem host (default: {DEFAULT_TMEM}; ignored with --server)")
    mount.add_argument("--abi", choices=ABIS, default=DEFAULT_ABI,
                       help="tmem ABI the guest speaks: v1 (192-bit oids), v0 (64-bit oids), auto = v1, then v0 "
                            "if the host refuses, then plain passthrough (default: %(default)s)")
    mount.add_argument("--v0-fold", choices=FOLDS, default="xxh64",
                       help="how v0 folds a 192-bit file key to 64 bits (default: %(default)s)")
    mount.add_argument("--compress", action="store_true",
                       help="ask the embedded host to compress this client's pages (default: off)")
    mount.add_argument("--ro", action="store_true", help="mount read-only (default: read-write)")
    mount.add_argument("--host-spec", choices=HOST_SPECS, default="auto",
                       help="ABI of the embedded host: v1, v0, both, or auto = v1 (both when --abi v0) "
                            "(default: %(default)s)")
    mount.add_argument("--server", metavar="ADDR", default=None,
                       help="use a running tmemd at tcp:HOST:PORT or unix:PATH instead of the embedded host "
                            "(default: embedded)")
    mount.add_argument("--fuse", choices=BINDINGS, default=_default_binding(),
                       help="FUSE binding: mfusepy on libfuse3 or fusepy on libfuse2 "
                            "(default: $GUESTFS_FUSE or mfusepy; currently %(default)s)")
    mount.add_argument("--attr-timeout", metavar="SECONDS", type=float, default=DEFAULT_ATTR_TIMEOUT,
                       help="kernel attribute/entry cache timeout (default: %(default)s)")
    mount.add_argument("--threads", choices=THREADS, default="single",
                       help="libfuse loop: single (lowest per-request cost) or multi (overlaps slow backing I/O) "
                            "(default: %(default)s)")
    mount.add_argument("-o", metavar="OPTS", dest="fuse_options", action="append", default=[],
                       help="extra FUSE options, comma-separated: allow_other, default_permissions, noatime, nodev, "
                            "nosuid, noexec, fsname=, subtype=, entry_timeout=, negative_timeout= (default: none)")
    mount.add_argument("--log", metavar="FILE", default=None,
                       help="daemon log file when detached (default: $XDG_RUNTIME_DIR or /tmp, "
                            "guestfs-UID/<mountpoint>.log)")
    mount.add_argument("--timeout", metavar="SECONDS", type=float, default=DEFAULT_MOUNT_TIMEOUT,
                       help="how long to wait for a detached mount to become live (default: %(default)s)")
    mount.add_argument("-v", "--verbose", action="store_true", help="debug logging (default: info)")

    umount = commands.add_parser("umount", help="unmount a guestfs mount",
                                 description="Unmount MOUNTPOINT (fusermount3 -u, fusermount -u, umount).")
    umount.add_argument("mountpoint", metavar="MOUNTPOINT")
    umount.add_argument("-z", "--lazy", action="store_true", help="lazy unmount if busy (default: off)")

    stats = commands.add_parser("stats", help="print a mount's cache statistics",
                                description="Print keying mode, ABI, hit/miss and tmem counters of a live mount.")
    stats.add_argument("mountpoint", metavar="MOUNTPOINT")
    stats.add_argument("--json", action="store_true", help="print raw JSON (default: text)")

    for name, (module, _) in _DELEGATES.items():
        commands.add_parser(name, help=f"run {module}.main with the remaining arguments", add_help=False)
    return parser


def mount_config(args: argparse.Namespace) -> MountConfig:
    """Validate every mount option into a MountConfig; raises UsageError (one line)."""
    try:
        return MountConfig.create(
            args.source, args.mountpoint,
            page_cache_pages=parse_pages(args.page_cache, "--page-cache"),
            tmem_pages=parse_pages(args.tmem, "--tmem"),
            abi=args.abi, fold=args.v0_fold, compress=args.compress, read_only=args.ro,
            host_spec=args.host_spec, server=args.server, binding=args.fuse,
            attr_timeout=args.attr_timeout, threads=args.threads, fuse_options=parse_fuse_options(args.fuse_options),
        )
    except ValueError as exc:
        raise UsageError(f"guestfs mount: error: {exc}") from None


def run_mount(args: argparse.Namespace) -> int:
    from guestfs import mount as mounting

    config = mount_config(args)
    if args.timeout <= 0:
        raise UsageError("guestfs mount: error: --timeout must be positive")
    if not args.foreground:
        try:
            handle = mounting.start_mount(config.source, config.mountpoint, config.to_args()
                                          + ["-v"] * args.verbose, timeout=args.timeout, log_path=args.log)
        except (mounting.MountError, OSError) as exc:  # OSError: e.g. the --log file cannot be created
            return _fail(f"guestfs mount: {exc}")
        print(f"guestfs: mounted {config.source} on {config.mountpoint} (pid {handle.process.pid}, "
              f"log {handle.log_path})")
        return 0
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s guestfs[%(process)d] %(levelname)s %(name)s: %(message)s")
    try:
        return mounting.mount(config)
    except mounting.MountError as exc:
        return _fail(f"guestfs mount: {exc}")
    except Exception as exc:  # the daemon's top level: full traceback to the log, one line for the user
        logging.getLogger("guestfs").exception("mount failed")
        return _fail(f"guestfs mount: {type(exc).__name__}: {exc}")


def run_umount(args: argparse.Namespace) -> int:
    from guestfs import mount as mounting

    try:
        mounting.unmount(args.mountpoint, lazy=args.lazy)
    except mounting.MountError as exc:
        return _fail(f"guestfs umount: {exc}")
    return 0


def run_stats(args: argparse.Namespace) -> int:
    from guestfs import mount as mounting

    try:
        stats = mounting.read_stats(args.mountpoint)
    except mounting.MountError as exc:
        return _fail(f"guestfs stats: {exc}")
    print(json.dumps(stats, indent=2, sort_keys=True) if args.json else format_stats(stats))
    return 0


def format_stats(stats: dict[str, Any]) -> str:
    """Human-readable stats: the headline numbers first, then every counter."""
    mode = stats.get("mode", "?")
    requested = f" (requested --abi {stats['abi']})" if "abi" in stats else ""
    lines = [f"keying/ABI: {mode}{requested}", ""]
    flat = _flatten(stats)
    width = max((len(name) for name in flat), default=0)
    lines += [f"{name:<{width}}  {value}" for name, value in flat.items()]
    return "\n".join(lines)


def _flatten(stats: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in sorted(stats.items()):
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def run_delegate(name: str, argv: list[str]) -> int:
    module_name, function = _DELEGATES[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            return _fail(f"guestfs {name}: not available ({module_name} is not installed)")
        raise
    entry: Callable[[list[str]], int | None] = getattr(module, function)
    return int(entry(argv) or 0)


def _fail(message: str) -> int:
    print(message, file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in _DELEGATES:
        return run_delegate(argv[0], argv[1:])
    try:
        args = build_parser().parse_args(argv)
        runners = {"mount": run_mount, "umount": run_umount, "stats": run_stats}
        return runners[args.command](args)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return 2
