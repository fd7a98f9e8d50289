"""tmemctl: inspect and convert save streams; list/freeze/thaw clients of a running tmemd.

    tmemctl stream inspect FILE [--json]
    tmemctl stream convert --to v0|v1 IN OUT
    tmemctl --server ADDR list [--long]
    tmemctl --server ADDR freeze|thaw CLIENT
    tmemctl --server ADDR save CLIENT FILE [--live]

Exit status: 0 ok, 1 bad data or a failed operation, 2 bad usage, 130 interrupted (Ctrl-C), 141
when the reader of its output went away (``| head``). Errors are one line on stderr, never a
traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

from . import abi, savestream
from .errors import StreamError
from .sizes import parse_seconds

EXIT_OK = 0
EXIT_DATA = 1
EXIT_USAGE = 2
LIST_BUFFER = 1 << 20


class UsageError(ValueError):
    """Bad command-line input (exit 2, one line): tmemctl's and tmemd's."""


class UsageParser(argparse.ArgumentParser):
    """argparse with a one-line usage error (no usage dump), for tmemctl and tmemd."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


MAX_SECONDS = 86_400.0  # a day: sockets refuse timeouts past time_t (1e10 was a traceback)


def positive_seconds(text: str) -> float:
    """A finite number of seconds > 0, at most a day (argparse type)."""
    try:
        return parse_seconds(text, "--timeout", allow_zero=False, maximum=MAX_SECONDS)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--timeout ")) from None


def client_id(text: str) -> int:
    """A client (domain) id 0..65534 (argparse type; 65535 is Xen's CLI_ID_NULL)."""
    if not text.isdigit() or int(text) >= abi.CLI_ID_NULL:
        raise argparse.ArgumentTypeError(f"must be a client id in 0..{abi.CLI_ID_NULL - 1}, got {text!r}")
    return int(text)


# ====================================================================== parser


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        prog="tmemctl",
        description="Inspect/convert tmem save streams and control a running tmemd.",
    )
    parser.add_argument("--server", metavar="ADDR",
                        help="tmemd address: unix:PATH or tcp:HOST:PORT (default: none; list, freeze, thaw "
                             "and save need it)")
    parser.add_argument("--timeout", type=positive_seconds, default=2.0,
                        help="seconds per server request (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=UsageParser)

    stream = commands.add_parser("stream", help="work on save-stream files (no server needed)")
    stream_commands = stream.add_subparsers(dest="stream_command", required=True, metavar="ACTION",
                                            parser_class=UsageParser)
    inspect = stream_commands.add_parser("inspect", help="show what a stream holds")
    inspect.add_argument("file", type=Path, help="stream file (starts with the -5 marker)")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text (default: text)")
    conv = stream_commands.add_parser("convert", help="rewrite a stream as v0 or v1")
    conv.add_argument("--to", required=True, choices=("v0", "v1"), help="target spec version")
    conv.add_argument("input", type=Path, metavar="IN")
    conv.add_argument("output", type=Path, metavar="OUT")

    listing = commands.add_parser("list", help="TMEMC_LIST of all clients (needs --server)")
    listing.add_argument("--long", action="store_true",
                         help="long format: also the second key group of each line (default: short)")
    for name, text in (("freeze", "freeze a client (new puts fail)"), ("thaw", "thaw a frozen client")):
        sub = commands.add_parser(name, help=f"{text} (needs --server)")
        sub.add_argument("client", type=client_id, help="client (domain) id, 0..65534")
    save = commands.add_parser("save", help="save a client's tmem to a stream file (needs --server)")
    save.add_argument("client", type=client_id, help="client (domain) id, 0..65534")
    save.add_argument("file", type=Path, help="output stream file")
    save.add_argument("--live", action="store_true",
                      help="live save: also write the extra section (default: off, a non-live save)")
    return parser


# ====================================================================== stream commands


def describe(image: savestream.ClientImage, size: int) -> dict[str, Any]:
    """A JSON-ready description of a parsed stream."""
    return {
        "bytes": size,
        "version": image.version,
        "max_pools": image.max_pools,
        "client": {
            "flags": image.flags,
            "compress": image.compress,
            "frozen": image.frozen,
            "weight": image.weight,
            "cap": image.cap,
        },
        "pools": [
            {
                "pool_id": pool.pool_id,
                "flags": pool.flags,
                "kind": pool.kind,
                "persistent": pool.persistent,
                "shared": pool.shared,
                "uuid": [f"{pool.uuid[0]:016x}", f"{pool.uuid[1]:016x}"],
                "n_pages": pool.stream_n_pages,
                "records": len(pool.pages),
                "terminator": pool.terminated,
            }
            for pool in image.pools
        ],
        "extra_section": None
        if image.invalidated is None
        else [{"pool_id": p, "oid": [f"{w:#x}" for w in oid.words], "index": i} for p, oid, i in image.invalidated],
    }


def render(info: dict[str, Any]) -> str:
    client = info["client"]
    names = [n for n in ("compress", "frozen") if client[n]] or ["none"]
    lines = [
        f"stream version v{info['version']}, {info['bytes']} bytes, max_pools {info['max_pools']}",
        f"client flags {client['flags']:#x} ({', '.join(names)}), weight {client['weight']}, cap {client['cap']}",
        f"pools: {len(info['pools'])}",
    ]
    for pool in info["pools"]:
        lines.append(
            f"  pool {pool['pool_id']}: {pool['kind']}, flags {pool['flags']:#010x}, "
            f"uuid {pool['uuid'][0]}:{pool['uuid'][1]}, n_pages {pool['n_pages']}, "
            f"records {pool['records']}, terminator {'yes' if pool['terminator'] else 'no'}"
        )
    extra = info["extra_section"]
    if extra is None:
        lines.append("extra section: absent (non-live save)")
    else:
        lines.append(f"extra section: {len(extra)} record(s)")
        lines.extend(f"  pool {r['pool_id']} oid ({', '.join(r['oid'])}) index {r['index']}" for r in extra)
    return "\n".join(lines)


class _CountedReads:
    """A file's reads, with how many bytes they returned (a pipe cannot ``tell()``)."""

    def __init__(self, fileobj: Any) -> None:
        self._file = fileobj
        self.consumed = 0

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size) or b""
        self.consumed += len(data)
        return data


def read_stream_file(path: Path) -> tuple[savestream.ClientImage, int]:
    """The stream in ``path`` (a file, or a pipe such as /dev/stdin) and its size in bytes."""
    with open(path, "rb") as stream:
        counted = _CountedReads(stream)
        image = savestream.read_stream(counted)  # type: ignore[arg-type]
        return image, counted.consumed


def cmd_inspect(args: argparse.Namespace) -> int:
    image, size = read_stream_file(args.file)
    info = describe(image, size)
    print(json.dumps(info, indent=2) if args.json else render(info))
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    image, _ = read_stream_file(args.input)
    converted = savestream.convert(image, abi.SPEC_V0 if args.to == "v0" else abi.SPEC_V1)
    write_atomically(args.output, lambda out: savestream.write_stream(converted, out))
    print(f"{args.output}: v{image.version} -> v{converted.version}, {len(converted.pools)} pool(s)")
    return EXIT_OK


def write_atomically(path: Path, write: Any) -> None:
    """Write through ``write(fileobj)`` into a temporary beside ``path``, then rename."""
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(temporary, "wb") as out:
            write(out)
        os.replace(temporary, path)
    except OSError as exc:  # name the file the user asked for, not our temporary
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    finally:
        temporary.unlink(missing_ok=True)


# ====================================================================== server commands


class _Dom0:
    """A RemoteTmem for client 0 shaped like the host savestream drives.

    ``spec_version`` is the control-record layout the server takes (a v0-only host wants
    40-byte records, as Xen 4.0.0's tools sent): probed once with the harmless
    SAVE_GET_MAXPOOLS, which a host answers -EFAULT when the layout is not its own.
    """

    def __init__(self, address: str, timeout: float) -> None:
        from .wire import RemoteTmem

        self.remote = RemoteTmem(address, 0, timeout)
        self.spec_version = abi.SPEC_V1

    def detect_version(self) -> int:
        for version in (abi.SPEC_V1, abi.SPEC_V0):
            probe = abi.control_record(abi.TMEMC_SAVE_GET_MAXPOOLS, 0, version=version)
            if self.remote.do_tmem_op(probe) != -errno.EFAULT:
                self.spec_version = version
                return version
        raise StreamError("the server takes neither v1 nor v0 control records")

    def control(self, subop: int, cli_id: int = abi.CLI_ID_NULL, arg1: int = 0, arg2: int = 0,
                buf: bytearray | None = None) -> int:
        record = abi.control_record(subop, cli_id, arg1=arg1, arg2=arg2, version=self.spec_version)
        return self.remote.do_tmem_op(record, buf)

    def do_tmem_op(self, client_id: int, op: bytes, page: bytearray | None = None) -> int:
        assert client_id == 0, "control ops are issued as client 0"
        return self.remote.do_tmem_op(op, page)

    def destroy_client(self, client_id: int) -> None:
        raise StreamError("destroying a client is not available over the wire")

    def close(self) -> None:
        self.remote.close()


def cmd_list(args: argparse.Namespace, dom0: _Dom0) -> int:
    buf = bytearray(LIST_BUFFER)
    rc = dom0.control(abi.TMEMC_LIST, arg1=len(buf), arg2=1 if args.long else 0, buf=buf)
    if rc < 0:
        return fail(f"LIST failed with {rc}", EXIT_DATA)
    text = bytes(buf).split(b"\0", 1)[0].decode("ascii", "replace")
    print(text.rstrip("\n"))
    return EXIT_OK


def cmd_freeze_thaw(args: argparse.Namespace, dom0: _Dom0) -> int:
    subop = abi.TMEMC_FREEZE if args.command == "freeze" else abi.TMEMC_THAW
    rc = dom0.control(subop, args.client)
    if rc < 0:
        return fail(f"{args.command} client {args.client} failed with {rc}", EXIT_DATA)
    print(f"client {args.client}: {args.command} ok")
    return EXIT_OK


def cmd_save(args: argparse.Namespace, dom0: _Dom0) -> int:
    image = savestream.snapshot_client(dom0, args.client, live=args.live)
    if image is None:
        return fail(f"client {args.client} has no tmem pools: nothing saved", EXIT_DATA)
    written: list[int] = []
    write_atomically(args.file, lambda out: written.append(savestream.write_stream(image, out)))
    print(f"{args.file}: client {args.client}, v{image.version}, {written[0]} bytes")
    return EXIT_OK


SERVER_COMMANDS = MappingProxyType(
    {"list": cmd_list, "freeze": cmd_freeze_thaw, "thaw": cmd_freeze_thaw, "save": cmd_save}
)


def run_server_command(args: argparse.Namespace) -> int:
    if not args.server:
        raise UsageError(f"'{args.command}' needs --server ADDR")
    from .wire import parse_address, unreachable

    parse_address(args.server)  # ValueError → usage error
    dom0 = _Dom0(args.server, args.timeout)
    try:
        try:
            dom0.remote.connect()
        except OSError as exc:
            return fail(unreachable(args.server, exc), EXIT_DATA)
        dom0.detect_version()
        return SERVER_COMMANDS[args.command](args, dom0)
    finally:
        dom0.close()


# ====================================================================== main


def fail(message: str, code: int) -> int:
    print(f"tmemctl: {message}", file=sys.stderr)
    return code


def reader_gone() -> int:
    """The reader of our stdout went away (``tmemctl list | head``): nothing to report. Stdout is
    pointed at /dev/null so the interpreter's last flush cannot fail again; the status is the one a
    shell shows for a process that SIGPIPE ended (128 + 13)."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, sys.stdout.fileno())
    os.close(null)
    return 128 + signal.SIGPIPE


def run(args: argparse.Namespace) -> int:
    if args.command == "stream":
        return cmd_inspect(args) if args.stream_command == "inspect" else cmd_convert(args)
    return run_server_command(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (argparse printed it)
        return int(exc.code or 0)
    except UsageError as exc:
        return fail(str(exc), EXIT_USAGE)
    try:
        return run(args)
    except (UsageError, ValueError) as exc:
        return fail(str(exc), EXIT_USAGE)
    except StreamError as exc:
        return fail(str(exc), EXIT_DATA)
    except BrokenPipeError:
        return reader_gone()
    except KeyboardInterrupt:  # Ctrl-C: what was under way cleaned up on the way out (a save thaws its client)
        return fail("interrupted", 128 + signal.SIGINT)
    except OSError as exc:  # missing files, refused or timed-out connections
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        return fail(f"{where}{exc.strerror or exc}", EXIT_DATA)


if __name__ == "__main__":
    raise SystemExit(main())
