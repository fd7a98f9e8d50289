"""``guestfs lab``: trace-driven hit-rate experiments (simulate, mrc, hitrate, keying, live).

Sizes are in pages (a bare number) or bytes with a K/M/G/T suffix (converted to 4 KiB pages),
at most 1 TiB.
Errors print one line on stderr, never a traceback: exit status 2 for bad usage (an unknown or
bad option value, a --trace/--tree/--source that does not exist, an --out that is not a
directory), 1 for a runtime failure (a trace that cannot be parsed, a mount that fails), 3 when a
replay through the real stack (simulate, hitrate) served wrong bytes (a cache bug: the stamped
pages did not match).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from guestfs.cli import UsageError, UsageParser
from tmemcore.sizes import MAX_SIZE, parse_size, size_to_pages


MAX_PAGES = size_to_pages(MAX_SIZE)
WRONG_BYTES_STATUS = 3  # a replay served bytes that were not the page's: a cache bug, never a miss


def parse_pages(text: str) -> int:
    """ "1000" -> 1000 pages; "64M" -> 16384 pages (bytes rounded up to whole 4 KiB pages); 0 allowed.

    At most 1 TiB either way (the limit of ``tmemcore.sizes``).
    """
    stripped = text.strip()
    if stripped.isdigit():
        if int(stripped) > MAX_PAGES:
            raise argparse.ArgumentTypeError(f"size {text!r} is larger than the 1 TiB limit ({MAX_PAGES:,} pages)")
        return int(stripped)
    try:
        return size_to_pages(parse_size(stripped))
    except ValueError as exc:
        if str(exc).startswith("invalid size"):  # parse_size's text speaks of bytes only; here a bare number is pages
            raise argparse.ArgumentTypeError(
                f"invalid size {text!r}: expected a number of 4 KiB pages, or bytes with a K/M/G/T suffix") from None
        raise argparse.ArgumentTypeError(str(exc)) from None  # too large: parse_size's sentence as it is


def parse_positive_pages(text: str) -> int:
    """Like ``parse_pages``, but the size must be at least one page (a cache of 0 pages is misuse)."""
    pages = parse_pages(text)
    if pages < 1:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be at least 1 page")
    return pages


def parse_page_list(text: str, parse_one: Callable[[str], int] = parse_pages) -> list[int] | str:
    """ "a,b,c" sizes (0 allowed: "no tmem"), or "auto"."""
    if text.strip() == "auto":
        return "auto"
    sizes = [parse_one(part) for part in text.split(",") if part.strip()]
    if not sizes:
        raise argparse.ArgumentTypeError(f"invalid size list {text!r}: comma-separated sizes, or auto")
    return sizes


def parse_positive_page_list(text: str) -> list[int] | str:
    """ "a,b,c" sizes of at least one page each, or "auto"."""
    return parse_page_list(text, parse_positive_pages)


def _parse_int(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid {what} {text!r}: an integer >= {minimum}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"invalid {what} {text!r}: must be >= {minimum}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (counts: --limit, --clients, --reads, --files)."""
    return _parse_int(text, 1, "count")


def non_negative_int(text: str) -> int:
    """An integer >= 0 (seeds: numpy refuses negative ones)."""
    return _parse_int(text, 0, "value")


MIN_GUEST_MEMORY = 4 << 20  # the reader process alone takes a few MiB of its cgroup


def parse_guest_memory(text: str) -> int:
    """ "32M" -> bytes (K/M/G/T suffixes or bytes); at least 4 MiB."""
    try:
        value = parse_size(text.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value < MIN_GUEST_MEMORY:
        raise argparse.ArgumentTypeError(f"invalid guest memory {text!r}: at least 4M (the reader itself needs a few MiB)")
    return value


def parse_factors(text: str) -> list[float]:
    """ "0,1,2,4" -> [0.0, 1.0, 2.0, 4.0]: multiples of the guest memory, each >= 0."""
    try:
        factors = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid factors {text!r}: comma-separated numbers from 0 to 1024") from None
    if not factors or any(not 0 <= f <= 1024 for f in factors):  # also false for NaN
        raise argparse.ArgumentTypeError(f"invalid factors {text!r}: comma-separated numbers from 0 to 1024")
    return factors


def parse_weights(text: str) -> list[int]:
    try:
        weights = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid weights {text!r}: comma-separated integers") from None
    if not weights or min(weights) < 1:
        raise argparse.ArgumentTypeError("weights must be positive integers")
    return weights


def _default_text(default: object) -> str:
    """How a default value reads in --help: flags are off/on, lists comma-separated."""
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, (list, tuple)):
        return ",".join(str(item) for item in default)
    return str(default)


class HelpFormatter(argparse.HelpFormatter):
    """Descriptions wrapped to the terminal paragraph by paragraph; every option's help ends with
    exactly one "(default: ...)". Shared with ``guestfs demo``.

    The text is rendered from the default value; an option whose default is None (meaning
    "computed at run time") must spell its default out in its help, which is then left alone.
    Required options get none. Flags whose default is suppressed (``--quiet`` repeated in each
    subcommand, so it does not override the top-level one) read "off".
    """

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text.strip())]
        return "\n\n".join(textwrap.fill(p, width, initial_indent=indent, subsequent_indent=indent)
                           for p in paragraphs)

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "(default: " in help_text or action.required or not action.option_strings:
            return help_text
        default = action.default
        if default is argparse.SUPPRESS:
            if not (action.nargs == 0 and action.const is True):  # --help: nothing to show
                return help_text
            default = False
        if default is None:
            raise AssertionError(f"{action.option_strings[0]}: a None default must be described in its help")
        shown = _default_text(default).replace("%", "%%")  # help strings are %-formatted by argparse
        return f"{help_text} (default: {shown})"


def _add_trace_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    from .traces import FORMATS

    if required:
        parser.add_argument("--trace", type=Path, required=True,
                            help="trace file (LIRS, ARC .lis, oracleGeneral .bin, CloudPhysics or MSR CSV; "
                            ".gz/.xz/.zst)")
    else:
        parser.add_argument("--trace", type=Path, action="append", default=None,
                            help="trace file (repeatable: one client per trace) (default: a seeded synthetic "
                            "zipf trace of 200,000 requests over 50,000 pages)")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="trace format (default: detected from the file name and contents)")
    parser.add_argument("--include-writes", action="store_true",
                        help="CSV traces: replay writes as reads of the same pages (default: off, reads only)")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="replay only the first N page requests (default: the whole trace)")


def _add_quiet(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand's default must not overwrite a --quiet given before the subcommand
    parser.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    # plain text in --help: the module docstring without its RST literal markup
    parser = UsageParser(prog="guestfs lab", description=(__doc__ or "").replace("``", ""),
                         formatter_class=HelpFormatter)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=UsageParser)

    sim = sub.add_parser("simulate", formatter_class=HelpFormatter,
                         help="replay a trace through page cache + tmem; one row per --tmem size",
                         description="Replay a trace of page reads through the real first-chance page cache, "
                         "cleancache frontend, in-process transport and tmemcore host (engine 'stack'), or the "
                         "reference OrderedDict model ('model'), or the exact LRU-curve fast path ('fast').")
    _add_trace_options(sim)
    sim.add_argument("--page-cache", type=parse_positive_pages, default=1000, help="first-chance cache size (pages)")
    sim.add_argument("--tmem", type=parse_pages, action="append", default=None,
                     help="tmem host size, 0 = none (repeat for several configurations) (default: 0)")
    sim.add_argument("--engine", choices=("stack", "model", "fast"), default="stack", help="what replays the trace")
    sim.add_argument("--opt", action="store_true", help="add the Belady bound at page-cache + tmem pages")
    sim.add_argument("--abi", choices=("v1", "v0", "auto"), default="v1", help="cleancache ABI (stack engine)")
    sim.add_argument("--fold", choices=("xxh64", "ino"), default="xxh64", help="v0 oid fold (stack engine)")
    sim.add_argument("--compress", action="store_true", help="host compresses pages (stack engine)")
    sim.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_quiet(sim)

    mrc = sub.add_parser("mrc", formatter_class=HelpFormatter, help="exact LRU miss-ratio curve of a trace",
                         description="Print (and with --out write CSV/JSON/PNG) the exact LRU hit/miss-ratio curve.")
    _add_trace_options(mrc)
    mrc.add_argument("--sizes", type=parse_positive_page_list, default="auto",
                     help="cache sizes a,b,c (each >= 1 page) or auto (log-spaced)")
    mrc.add_argument("--opt", action="store_true", help="add Belady at the same sizes")
    mrc.add_argument("--out", type=Path, default=None, help="directory for CSV/JSON/PNG (default: print only)")
    mrc.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_quiet(mrc)

    hit = sub.add_parser("hitrate", formatter_class=HelpFormatter, help="tmem-size sweep, exclusive vs shared, clients",
                         description="Miss-ratio curves over tmem sizes behind a fixed page cache: no-tmem baseline, "
                         "Belady bound, exclusive (private pool) vs non-exclusive (shared pool) second chance; "
                         "several guests can share one host budget with --weights: K guests splitting one "
                         "trace by page key (--clients K), or one guest per --trace.")
    _add_trace_options(hit, required=False)
    hit.add_argument("--page-cache", type=parse_positive_pages, default=1000,
                     help="first-chance cache size per guest (pages)")
    hit.add_argument("--tmem-sizes", type=parse_page_list, default="auto", help="tmem sizes a,b,c (0 = none) or auto")
    hit.add_argument("--clients", type=positive_int, default=None,
                     help="guests sharing one tmem host, whose budget is the largest --tmem-sizes (auto: half "
                          "of all guests' distinct pages): with one --trace, K guests each replay the requests "
                          "whose page key hashes to them; with several, one guest per trace, so K must be their "
                          "number (default: 1 per trace)")
    hit.add_argument("--weights", type=parse_weights, default=None,
                     help="client weights 1,2,... one per client (default: 1 for every client)")
    hit.add_argument("--engine", choices=("stack", "model"), default="stack",
                     help="exclusive curve replayed through the real stack (checked against the fast path) or model")
    hit.add_argument("--no-opt", action="store_true", help="skip the Belady bound")
    hit.add_argument("--seed", type=non_negative_int, default=1,
                     help="seed of the synthetic trace used when no --trace is given")
    hit.add_argument("--out", type=Path, default=None, help="output directory (default: ./results/hitrate)")
    _add_quiet(hit)

    key = sub.add_parser("keying", formatter_class=HelpFormatter, help="v0-vs-v1 file keying comparison",
                         description="(a) keys of real file trees: handle types/sizes, collisions of v1 and each "
                         "v0 fold, inode reuse; --btrfs adds a btrfs image with two subvolumes; (b) --live runs the "
                         "same reads through real mounts with --abi v1 and v0 (each fold). Trees are only read, "
                         "except that inode reuse is per filesystem: for a tree on another filesystem than the "
                         "temp dir's, a hidden scratch dir .guestfs-keying-* is made (and removed) in the tree when "
                         "it is writable, else the temp dir's filesystem is measured.")
    key.add_argument("--tree", type=Path, action="append", default=None,
                     help="directory tree (repeatable) (default: /usr/share)")
    key.add_argument("--btrfs", action="store_true", help="also study a btrfs image with subvolumes (needs root, loop)")
    key.add_argument("--live", action="store_true", help="also read through live mounts (v1, v0-xxh64, v0-ino)")
    key.add_argument("--limit", type=positive_int, default=50_000, help="at most this many files per tree")
    key.add_argument("--out", type=Path, default=None, help="output directory (default: ./results/keying)")
    _add_quiet(key)

    live = sub.add_parser("live", formatter_class=HelpFormatter, help="zipf workload through a real mount, tmem sweep",
                          description="A seeded zipf read workload (fio when it can run, else a built-in reader) "
                          "through a real guestfs mount for each tmem size, with and without compression. "
                          "--source is only read: fio reads a file in a private scratch tree made from it. "
                          "With --guest-memory the workload runs as a separate process in a memory cgroup of "
                          "that size (needs root and a writable cgroup v1 or v2 memory controller), as a guest "
                          "whose page cache is bounded; it matters most with --first-chance kernel, where the "
                          "kernel's page cache of the mount is the guest's first chance. "
                          "\n\n"
                          "--value-table runs the value table instead: an ext4 image on a loop device with "
                          "direct-io on (root), a working set 4x --guest-memory written on it, the same seeded "
                          "zipf sequence in a fresh cgroup of --guest-memory for each row: guestfs "
                          "(--first-chance kernel --backing-direct) on a tmemd outside the cgroup for each "
                          "--tmem-factors size, then O_DIRECT reads of the files without FUSE and bindfs over "
                          "them; wall time, device and backing MiB, tmem hit ratio and host memory per row, the "
                          "issue's targets checked. Writes value.csv, value.json, value-time.png, "
                          "value-backing.png and summary.md into --out.")
    live.add_argument("--source", type=Path, default=None,
                      help="backing tree, never written (default: a scratch copy of text files from /usr/share)")
    live.add_argument("--tmem-sizes", type=parse_page_list, default=[0, 1024, 4096],
                      help="tmem sizes a,b,c (0 = a one-page host) or auto")
    live.add_argument("--page-cache", type=parse_positive_pages, default=256,
                      help="first-chance cache size (pages; --first-chance daemon)")
    live.add_argument("--compress", action="store_true", help="also run every size with host compression")
    live.add_argument("--reads", type=positive_int, default=None,
                      help="4 KiB reads per run (default: 4000; with --value-table 2 per working-set page)")
    live.add_argument("--files", type=positive_int, default=None,
                      help="files in the generated source tree (default: 200; with --value-table the working set "
                      "is split into 8)")
    live.add_argument("--workload", choices=("auto", "fio", "builtin"), default="auto",
                      help="auto/fio: fio (random_distribution=zipf) when it can run, else the built-in zipf "
                      "reader, which also checks every byte read")
    live.add_argument("--first-chance", choices=("kernel", "daemon"), default=None,
                      help="passed to guestfs mount: daemon counts every read exactly, kernel leaves repeated "
                      "reads to the kernel's page cache (default: daemon; kernel with --value-table)")
    live.add_argument("--backing-direct", action=argparse.BooleanOptionalAction, default=None,
                      help="passed to guestfs mount: read misses from the backing files with O_DIRECT (default: "
                      "off; on with --value-table)")
    live.add_argument("--threads", choices=("single", "multi"), default="single",
                      help="passed to guestfs mount: libfuse's loop")
    live.add_argument("--guest-memory", type=parse_guest_memory, default=None, metavar="SIZE",
                      help="run the workload in a memory cgroup of this size, K/M/G suffixes or bytes, at least "
                      "4M (default: no cgroup; 16M with --value-table)")
    live.add_argument("--value-table", action="store_true",
                      help="run the value table (see above) instead of the tmem sweep")
    live.add_argument("--tmem-factors", type=parse_factors, default=None,
                      help="--value-table: tmem sizes as multiples of --guest-memory, a,b,c (0 = a one-page tmemd) "
                      "(default: 0,1,2,4)")
    live.add_argument("--no-baselines", action="store_true",
                      help="--value-table: skip the O_DIRECT and bindfs rows")
    live.add_argument("--no-warmup", action="store_true",
                      help="--value-table: no sequential pass over the working set before the timed reads (every "
                      "row then starts from empty caches)")
    live.add_argument("--profile", action="store_true",
                      help="--value-table: also measure where the time goes: microseconds per 4 KiB read of each "
                      "layer (device O_DIRECT, host page cache, bindfs, tmemd's socket round trip, guestfs hits and "
                      "misses with --threads single and multi), outside any cgroup (about 15 s more)")
    live.add_argument("--seed", type=non_negative_int, default=1, help="workload seed")
    live.add_argument("--out", type=Path, default=None,
                      help="output directory (default: ./results/live; ./results/value with --value-table)")
    _add_quiet(live)
    return parser


def _usage(args: argparse.Namespace, message: str) -> NoReturn:
    raise UsageError(f"guestfs lab {args.command}: error: {message}")


def input_file_problem(option: str, path: Path) -> str:
    """Why ``path``, named by ``option``, cannot be read as an input file ("" when it can be)."""
    if path.is_dir():
        return f"{option} {path} is a directory, not a file"
    if not path.exists():
        return f"{option} {path} does not exist"
    return ""


def input_dir_problem(option: str, path: Path) -> str:
    """Why ``path`` cannot be read as an input directory tree ("" when it can be)."""
    if not path.exists():
        return f"{option} {path} does not exist"
    if not path.is_dir():
        return f"{option} {path} is not a directory"
    return ""


def out_dir_problem(option: str, path: Path) -> str:
    """Why ``path`` cannot become an output directory: it, or the nearest existing parent, is not a directory."""
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or existing.is_dir():
        return ""
    if existing == path:
        return f"{option} {path} is not a directory"
    return f"{option} {path} cannot be created: {existing} is not a directory"


def check_args(args: argparse.Namespace) -> None:
    """Checks beyond one option's value; raises ``UsageError`` (one line, exit status 2).

    Input files and trees named on the command line must exist (a missing one is bad usage, not a
    runtime failure), and --out must be, or be creatable as, a directory: checked before any work.
    """
    if args.command == "hitrate":
        traces = len(args.trace or []) or 1
        if args.clients is not None and traces > 1 and args.clients != traces:
            _usage(args, f"argument --clients: {args.clients} clients for {traces} traces (one client per trace)")
        args.clients = args.clients or traces
        if args.weights is not None and len(args.weights) != args.clients:
            _usage(args, f"argument --weights: {len(args.weights)} weights for {args.clients} clients")
    if args.command == "live":
        _check_live_args(args)
    traces = args.trace if isinstance(getattr(args, "trace", None), list) else [getattr(args, "trace", None)]
    problems = [input_file_problem("--trace", trace) for trace in traces if trace is not None]
    problems += [input_dir_problem("--tree", tree) for tree in getattr(args, "tree", None) or []]
    if getattr(args, "source", None) is not None:
        problems.append(input_dir_problem("--source", args.source))
    if getattr(args, "out", None) is not None:
        problems.append(out_dir_problem("--out", args.out))
    problem = next((p for p in problems if p), "")
    if problem:
        _usage(args, problem)


def _check_live_args(args: argparse.Namespace) -> None:
    """Options that belong to the sweep or to the value table only."""
    if args.value_table:
        for given, option in ((args.source is not None, "--source"), (args.compress, "--compress"),
                              (args.workload != "auto", "--workload")):
            if given:
                _usage(args, f"argument {option}: not with --value-table (it writes and reads its own working set)")
        return
    for given, option in ((args.tmem_factors is not None, "--tmem-factors"),
                          (args.no_baselines, "--no-baselines"), (args.no_warmup, "--no-warmup"),
                          (args.profile, "--profile")):
        if given:
            _usage(args, f"argument {option}: only with --value-table")


def describe_error(exc: BaseException) -> str:
    """One line for a runtime failure: ``PATH: strerror`` for an OSError instead of "[Errno N] ..."."""
    if isinstance(exc, OSError) and exc.strerror:
        names = [str(name) for name in (exc.filename, exc.filename2) if name is not None]
        return ": ".join([" -> ".join(names), exc.strerror] if names else [exc.strerror])
    return str(exc)


# --- commands -----------------------------------------------------------------------------------


def _load(args: argparse.Namespace, path: Path):
    from .traces import load_trace

    trace = load_trace(path, args.format, include_writes=args.include_writes)
    return trace.head(args.limit) if args.limit is not None else trace


def cmd_simulate(args: argparse.Namespace) -> int:
    from .report import Progress, percent
    from .simulate import simulate_configs

    trace = _load(args, args.trace)
    tmem_sizes = args.tmem or [0]
    with Progress(trace.requests * len(tmem_sizes), f"simulate {trace.name}", quiet=args.quiet) as bar:
        results = simulate_configs(
            trace, args.page_cache, tmem_sizes, engine=args.engine, opt=args.opt,
            abi=args.abi, fold=args.fold, compress=args.compress, progress=bar.callback,
        )
    status = 0 if all(r.wrong_bytes == 0 for r in results) else WRONG_BYTES_STATUS
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
        return status
    print(f"trace {trace.name} ({trace.format}): {trace.requests:,} page requests, engine {args.engine}")
    header = f"{'page cache':>10} {'tmem':>8} {'requests':>10} {'pc hits':>9} {'tmem hits':>9} {'misses':>9} " \
             f"{'hit %':>8} {'pc %':>8} {'tmem %':>8}{' belady %':>10} {'wrong B':>8} {'req/s':>10}"
    print(header)
    for r in results:
        belady = percent(r.ratio(r.belady_hits)) if r.belady_hits is not None else "-"
        print(f"{r.page_cache_pages:>10,} {r.tmem_pages:>8,} {r.requests:>10,} {r.page_cache_hits:>9,} "
              f"{r.tmem_hits:>9,} {r.misses:>9,} {percent(r.hit_ratio):>8} {percent(r.ratio(r.page_cache_hits)):>8} "
              f"{percent(r.ratio(r.tmem_hits)):>8}{belady:>10} {r.wrong_bytes:>8,} {r.requests_per_second:>10,.0f}")
    return status


def cmd_mrc(args: argparse.Namespace) -> int:
    from .hitrate import mrc_experiment

    trace = _load(args, args.trace)
    rows = mrc_experiment(trace, args.sizes, opt=args.opt, out=args.out, quiet=args.quiet)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"trace {trace.name} ({trace.format}): {trace.requests:,} page requests")
    print(f"{'size':>10} {'LRU hit %':>10} {'miss %':>8}" + (f" {'Belady %':>9}" if args.opt else ""))
    for row in rows:
        line = f"{row['size']:>10,} {100 * row['lru_hit_ratio']:>10.2f} {100 * (1 - row['lru_hit_ratio']):>8.2f}"
        if args.opt:
            line += f" {100 * row['belady_hit_ratio']:>9.2f}"
        print(line)
    if args.out:
        print(f"wrote {args.out}")
    return 0


def cmd_hitrate(args: argparse.Namespace) -> int:
    from .hitrate import run_hitrate

    out = args.out or Path("results") / "hitrate"
    summary, wrong_bytes = run_hitrate(args, out)
    print(summary)
    print(f"wrote {out}")
    return 0 if wrong_bytes == 0 else WRONG_BYTES_STATUS


def cmd_keying(args: argparse.Namespace) -> int:
    from .keying import run_keying_experiment

    out = args.out or Path("results") / "keying"
    print(run_keying_experiment(args, out))
    print(f"wrote {out}")
    return 0


def cmd_live(args: argparse.Namespace) -> int:
    from .live import run_live_experiment, run_value_table

    if args.value_table:
        out = args.out or Path("results") / "value"
        summary, wrong_reads = run_value_table(args, out)
        print(summary)
        print(f"wrote {out}")
        return 0 if wrong_reads == 0 else WRONG_BYTES_STATUS
    out = args.out or Path("results") / "live"
    print(run_live_experiment(args, out))
    print(f"wrote {out}")
    return 0


COMMANDS = {"simulate": cmd_simulate, "mrc": cmd_mrc, "hitrate": cmd_hitrate, "keying": cmd_keying, "live": cmd_live}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``guestfs lab``; returns the exit status."""
    from .traces import TraceError

    try:
        args, extra = build_parser().parse_known_args(argv)
        if extra:  # argparse would blame the top-level parser: name the subcommand they were given to
            _usage(args, f"unrecognized arguments: {' '.join(extra)}")
        check_args(args)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    args.quiet = bool(getattr(args, "quiet", False))
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # the reader of our output went away (`| head`): not a failure to report
        raise
    except (TraceError, ValueError, OSError, RuntimeError) as exc:  # TraceError: a trace that cannot be parsed
        print(f"guestfs lab {args.command}: error: {describe_error(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
