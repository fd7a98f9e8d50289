"""``guestfs`` command line: mount, umount, stats, and the lab/demo entry points.

Exit status: 0 success, 1 runtime failure (mount did not come up, tmemd unreachable, not a guestfs
mount), 2 bad usage (unknown or contradictory option, bad size or number, missing source, mountpoint
not a directory) -- always one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from guestfs.config import (
    ABIS,
    BINDINGS,
    FIRST_CHANCES,
    FOLDS,
    HOST_SPECS,
    MAX_ATTR_TIMEOUT,
    MAX_CLIENT_ID,
    MOUNT_TYPE,
    THREADS,
    PAGE_CACHE_NEEDS_DAEMON,
    MountConfig,
    mount_type,
    parse_fuse_options,
    parse_pages,
    parse_seconds,
)
from tmemcore.cli import reader_gone

DEFAULT_PAGE_CACHE = "16M"
DEFAULT_TMEM = "256M"
DEFAULT_ABI = "auto"
DEFAULT_HOST_SPEC = "auto"
DEFAULT_ATTR_TIMEOUT = 1.0
DEFAULT_MOUNT_TIMEOUT = 10.0
SERVER_PROBE_TIMEOUT = 5.0  # seconds to connect to a --server before mounting

_DELEGATES = {"lab": ("guestfs.lab.cli", "main"), "demo": ("guestfs.demo", "main")}
_DELEGATE_HELP = {
    "lab": "trace-driven hit-rate experiments (see guestfs lab --help)",
    "demo": "mount a sample tree, run a workload, show hit rates and v0/v1 keying (see guestfs demo --help)",
}


class UsageError(Exception):
    """Bad command-line input; reported as one line with exit status 2."""


class UsageParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump): ``PROG: error: MESSAGE``, exit status 2.

    ``error`` raises ``UsageError``; each ``main`` prints it and returns 2 (guestfs, lab, demo).
    """

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message}")


def _seconds(what: str, *, allow_zero: bool, maximum: float = math.inf) -> Callable[[str], float]:
    """An argparse type: finite seconds (NaN or infinity would make every deadline unreachable)."""
    def parse(text: str) -> float:
        try:
            return parse_seconds(text, what, allow_zero=allow_zero, maximum=maximum)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{what} ")) from None

    return parse


def _client_id(text: str) -> int:
    """An argparse type: a guest client (domain) id 1..65534."""
    if not text.isdigit() or not 1 <= int(text) <= MAX_CLIENT_ID:
        raise argparse.ArgumentTypeError(f"must be a client id in 1..{MAX_CLIENT_ID}, got {text!r}")
    return int(text)


def _default_binding() -> str:
    return os.environ.get("GUESTFS_FUSE", "mfusepy")


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(prog="guestfs", description="FUSE passthrough filesystem with a tmem second-chance page cache.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=UsageParser)

    mount = commands.add_parser("mount", help="mount SOURCE at MOUNTPOINT (returns once the mount is live)",
                                description="Mount the directory SOURCE at MOUNTPOINT through guestfs. Without -f the "
                                            "daemon runs detached and the command returns once the mount answers.")
    mount.add_argument("source", metavar="SOURCE", help="backing directory")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT",
                       help="directory to mount on (its contents are hidden while mounted)")
    mount.add_argument("-f", "--foreground", action="store_true",
                       help="serve in the foreground until unmounted or signalled (default: detach)")
    mount.add_argument("--first-chance", choices=FIRST_CHANCES, default="kernel",
                       help="who serves repeated reads: kernel = the kernel's page cache (native speed; guestfs "
                            "sees only its misses and puts every page it reads into tmem), daemon = guestfs's own "
                            "first-chance cache (every read reaches the daemon: exact per-read counts, exclusive "
                            "tmem gets; what the lab uses) (default: %(default)s)")
    mount.add_argument("--page-cache", metavar="SIZE", default=None,
                       help="size of guestfs's own first-chance cache (--first-chance daemon only), K/M/G "
                            f"suffixes or bytes, rounded up to 4 KiB pages (default: {DEFAULT_PAGE_CACHE})")
    mount.add_argument("--backing-direct", action="store_true",
                       help="read misses from the backing files with O_DIRECT, so the host's page cache does not "
                            "serve what a guest's disk would read (falls back to normal reads, with a notice, "
                            "where the filesystem refuses O_DIRECT) (default: off)")
    mount.add_argument("--tmem", metavar="SIZE", default=None,
                       help=f"memory budget of the embedded tmem host, at most 1T (default: {DEFAULT_TMEM}; "
                            "not with --server)")
    mount.add_argument("--abi", choices=ABIS, default=DEFAULT_ABI,
                       help="tmem ABI the guest speaks: v1 (192-bit oids), v0 (64-bit oids), auto = v1, then v0 "
                            "if the host refuses, then plain passthrough (default: %(default)s)")
    mount.add_argument("--v0-fold", choices=FOLDS, default="xxh64",
                       help="how v0 folds a 192-bit file key to 64 bits (default: %(default)s)")
    mount.add_argument("--compress", action="store_true",
                       help="ask the embedded host to compress this client's pages (default: off; not with "
                            "--server: a tmemd compresses per its --compress-default)")
    mount.add_argument("--ro", action="store_true", help="mount read-only (default: read-write)")
    mount.add_argument("--host-spec", choices=HOST_SPECS, default=None,
                       help="ABI of the embedded host: v1, v0, both, or auto = v1 (both when --abi v0) "
                            f"(default: {DEFAULT_HOST_SPEC}; not with --server)")
    mount.add_argument("--server", metavar="ADDR", default=None,
                       help="use a running tmemd at tcp:HOST:PORT or unix:PATH instead of the embedded host; "
                            "it must be reachable or the mount fails (default: embedded)")
    mount.add_argument("--client-id", metavar="N", type=_client_id, default=None,
                       help=f"tmem client (domain) id 1..{MAX_CLIENT_ID} of this mount (default: 1 on the embedded "
                            "host; with --server the lowest id no other connection uses, assigned by tmemd)")
    mount.add_argument("--fuse", choices=BINDINGS, default=_default_binding(),
                       help="FUSE binding: mfusepy on libfuse3 or fusepy on libfuse2 "
                            "(default: $GUESTFS_FUSE or mfusepy; currently %(default)s)")
    mount.add_argument("--attr-timeout", metavar="SECONDS", type=_seconds("--attr-timeout", allow_zero=True, maximum=MAX_ATTR_TIMEOUT),
                       default=DEFAULT_ATTR_TIMEOUT,
                       help="kernel attribute/entry cache timeout, 0..3600 (default: %(default)s)")
    mount.add_argument("--threads", choices=THREADS, default="single",
                       help="libfuse loop: single (lowest per-request cost) or multi (overlaps slow backing I/O) "
                            "(default: %(default)s)")
    mount.add_argument("-o", metavar="OPTS", dest="fuse_options", action="append", default=[],
                       help="extra FUSE options, comma-separated: allow_other, default_permissions, noatime, nodev, "
                            "nosuid, noexec, fsname=, entry_timeout=, negative_timeout= (default: none; the "
                            "mount is always nodev,nosuid)")
    mount.add_argument("--log", metavar="FILE", default=None,
                       help="daemon log file when detached (default: $XDG_RUNTIME_DIR or /tmp, "
                            "guestfs-UID/<mountpoint>.log)")
    mount.add_argument("--timeout", metavar="SECONDS", type=_seconds("--timeout", allow_zero=False),
                       default=DEFAULT_MOUNT_TIMEOUT,
                       help="how long to wait for a detached mount to become live, > 0 (default: %(default)s)")
    mount.add_argument("-v", "--verbose", action="store_true", help="debug logging (default: info)")

    umount = commands.add_parser("umount", help="unmount a guestfs mount",
                                 description="Unmount the guestfs mount at MOUNTPOINT (fusermount3 -u, fusermount -u, "
                                             "umount); anything else mounted there is refused.")
    umount.add_argument("mountpoint", metavar="MOUNTPOINT")
    umount.add_argument("-z", "--lazy", action="store_true", help="lazy unmount if busy (default: off)")

    stats = commands.add_parser("stats", help="print a mount's cache statistics",
                                description="Print keying mode, ABI, hit/miss and tmem counters of a live mount.")
    stats.add_argument("mountpoint", metavar="MOUNTPOINT")
    stats.add_argument("--json", action="store_true", help="print raw JSON (default: text)")
    stats.add_argument("--all", action="store_true",
                       help="after the summary, list every counter, host counters included (default: summary only)")

    for name in _DELEGATES:
        commands.add_parser(name, help=_DELEGATE_HELP[name], add_help=False)
    return parser


def mount_config(args: argparse.Namespace) -> MountConfig:
    """Validate every mount option into a MountConfig; raises UsageError (one line)."""
    try:
        _refuse_embedded_options_with_server(args)
        page_cache_pages = parse_pages(args.page_cache or DEFAULT_PAGE_CACHE, "--page-cache")
        if args.page_cache is not None and args.first_chance == "kernel":  # even when it names the default
            raise ValueError(PAGE_CACHE_NEEDS_DAEMON)
        return MountConfig.create(
            args.source, args.mountpoint,
            page_cache_pages=page_cache_pages,
            tmem_pages=parse_pages(DEFAULT_TMEM if args.tmem is None else args.tmem, "--tmem"),
            abi=args.abi, fold=args.v0_fold, compress=args.compress, read_only=args.ro,
            host_spec=args.host_spec or DEFAULT_HOST_SPEC, server=args.server, client_id=args.client_id,
            binding=args.fuse, attr_timeout=args.attr_timeout, threads=args.threads,
            fuse_options=parse_fuse_options(args.fuse_options),
            first_chance=args.first_chance, backing_direct=args.backing_direct,
        )
    except ValueError as exc:
        raise UsageError(f"guestfs mount: error: {exc}") from None


def _refuse_embedded_options_with_server(args: argparse.Namespace) -> None:
    """--tmem and --host-spec configure the embedded host; with --server they would be silently ignored."""
    if args.server is None:
        return
    for option, value in (("--tmem", args.tmem), ("--host-spec", args.host_spec)):
        if value is not None:
            raise ValueError(f"{option} configures the embedded host and cannot be used with --server")


def run_mount(args: argparse.Namespace) -> int:
    from guestfs import mount as mounting

    config = mount_config(args)
    if config.server is not None and not args.foreground:  # (a foreground daemon's build_stack connects itself)
        from guestfs.stack import probe_server
        from guestfs.transport import ServerUnreachable

        try:  # before anything is mounted: an unreachable host is an error, not a silent passthrough
            probe_server(config.server, config.client_id, timeout=min(args.timeout, SERVER_PROBE_TIMEOUT))
        except ServerUnreachable as exc:
            return _fail(f"guestfs mount: {exc}")
    if not args.foreground:
        try:
            handle = mounting.start_mount(config.source, config.mountpoint, config.to_args()
                                          + ["-v"] * args.verbose, timeout=args.timeout, log_path=args.log)
        except (mounting.MountError, OSError) as exc:
            return _fail(f"guestfs mount: {exc}")
        print(f"guestfs: mounted {config.source} on {os.path.realpath(config.mountpoint)} "
              f"(pid {handle.process.pid}, log {handle.log_path})")
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

    kind = mount_type(args.mountpoint)
    if kind != MOUNT_TYPE:  # never unmount somebody else's filesystem (the last fallback is plain umount)
        what = "nothing is mounted there" if kind is None else f"it is a {kind} mount"
        return _fail(f"guestfs umount: {args.mountpoint} is not a guestfs mount ({what})")
    try:
        mounting.unmount(args.mountpoint, lazy=args.lazy)
    except mounting.MountError as exc:
        busy = " (a process has a file or its working directory inside; close it, or use -z)" \
            if "busy" in str(exc) and not args.lazy else ""
        return _fail(f"guestfs umount: {exc}{busy}")
    return 0


def run_stats(args: argparse.Namespace) -> int:
    from guestfs import mount as mounting

    try:
        stats = mounting.read_stats(args.mountpoint)
    except mounting.MountError as exc:
        return _fail(f"guestfs stats: {exc}")
    print(json.dumps(stats, indent=2, sort_keys=True) if args.json else format_stats(stats, args.all))
    return 0


# The summary: (heading, [(label, counter name)]); names are Stack.stats() keys, Linux's and Xen's where
# they exist. A counter missing from a mount's stats is left out rather than shown as 0.
SUMMARY: list[tuple[str, list[tuple[str, str]]]] = [
    ("first-chance page cache", [("hits", "page_cache_hits"), ("misses", "page_cache_misses"),
                                 ("evictions", "page_cache_evictions"),
                                 ("pages held", "page_cache_pages"), ("capacity (pages)", "page_cache_capacity")]),
    ("cleancache (Linux names)", [("succ_gets", "succ_gets"), ("failed_gets", "failed_gets"), ("puts", "puts"),
                                  ("invalidates", "invalidates")]),
    ("keying", [("v0 fold collisions", "fold_collisions"), ("v1 oid collisions", "oid_collisions"),
                ("transport errors", "transport_errors")]),
    ("backing store", [("reads", "backing_reads"), ("bytes read", "backing_bytes_read"),
                       ("bytes written", "bytes_written"),
                       ("racy_pages_not_cached", "racy_pages_not_cached")]),
]
# --first-chance kernel: no first-chance cache of ours; tmem is inclusive (gets leave the page there).
KERNEL_SUMMARY = [
    ("reads that reached the daemon (kernel page-cache misses)", [("read requests", "reads"),
                                                                 ("pages asked of tmem", "page_cache_misses")]),
    ("tmem, inclusive behind the kernel (Linux names)", [("hits (succ_gets)", "succ_gets"),
                                                         ("misses (failed_gets)", "failed_gets"),
                                                         ("pages put", "puts"), ("invalidates", "invalidates")]),
    *SUMMARY[2:],
]
POOL_COUNTERS = ("pgp_count", "good_puts", "puts", "found_gets", "gets", "flushs_found", "flushs",
                 "flush_objs", "dup_puts_replaced", "dup_puts_flushed", "no_mem_puts")


def format_stats(stats: dict[str, Any], everything: bool = False) -> str:
    """Human-readable stats: keying mode, then the headline counters by layer, then (``everything``)
    every counter flattened as ``a.b.c``."""
    mode = stats.get("mode", "?")
    requested = f" (requested --abi {stats['abi']})" if "abi" in stats else ""
    client = f", client {stats['client_id']}" if "client_id" in stats else ""
    host = f", host {stats['server']}" if stats.get("server") else ", embedded host" if "host" in stats else ""
    lines = [f"keying/ABI: {mode}{requested}{client}{host}"]
    if stats.get("disabled_reason"):
        lines.append(f"tmem off: {stats['disabled_reason']}")
    summary = SUMMARY
    if stats.get("first_chance") == "kernel":
        lines += ["first chance: the kernel's page cache; kernel page-cache hits are not counted (they never reach "
                  "the daemon): the counters below are the reads the kernel missed"]
        summary = KERNEL_SUMMARY
    if stats.get("backing_direct"):
        lines.append("backing store: misses read with O_DIRECT (--backing-direct)")
    for heading, rows in summary + _pool_rows(stats):
        present = [(label, stats.get(name, "-") if isinstance(name, str) else name) for label, name in rows
                   if not isinstance(name, str) or name in stats]
        if present:
            lines += ["", heading] + [f"  {label:<26} {value}" for label, value in present]
    if everything:
        flat = _flatten(stats)
        width = max((len(name) for name in flat), default=0)
        lines += ["", "all counters"] + [f"  {name:<{width}}  {value}" for name, value in flat.items()]
    return "\n".join(lines)


def _pool_rows(stats: dict[str, Any]) -> list[tuple[str, list[tuple[str, Any]]]]:
    """This guest's tmem pool counters (Xen's names), when the host is embedded."""
    host = stats.get("host") or {}
    client = next((c for c in host.get("clients", []) if c.get("cli_id") == stats.get("client_id")), None)
    pool = next((p for p in (client or {}).get("pools", []) if p.get("pool_id") == stats.get("pool_id")), None)
    if pool is None:
        return []
    return [(f"tmem pool {pool['pool_id']} ({pool.get('type', '?')})",
             [(name, pool[name]) for name in POOL_COUNTERS if name in pool])]


def _flatten(stats: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in sorted(stats.items()):
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{name}."))
        elif isinstance(value, list) and all(isinstance(item, dict) for item in value):
            for number, item in enumerate(value):
                flat.update(_flatten(item, f"{prefix}{name}[{number}]."))
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
    try:
        if argv and argv[0] in _DELEGATES:
            return run_delegate(argv[0], argv[1:])
        args = build_parser().parse_args(argv)
        runners = {"mount": run_mount, "umount": run_umount, "stats": run_stats}
        return runners[args.command](args)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `guestfs lab mrc ... | head`
        return reader_gone()
