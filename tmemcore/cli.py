"""tmemctl: work on save streams and run every control op of a running tmemd (as xl/xm tmem-* did).

    tmemctl stream inspect FILE [--json] [--verify KEYFILE]
    tmemctl stream convert --to v0|v1 IN OUT
    tmemctl stream seal --key KEYFILE IN OUT        # wrap a libxc stream in an HMAC-SHA256 envelope
    tmemctl stream unseal --key KEYFILE IN OUT      # verify, then write the libxc stream inside
    tmemctl stream verify --key KEYFILE FILE        # verify the seal and the stream inside
    tmemctl keygen FILE                             # a new seal key, mode 0600
    tmemctl --server ADDR list [--long] [--json]
    tmemctl --server ADDR freeze|thaw CLIENT|all
    tmemctl --server ADDR set-weight|set-cap CLIENT|all N
    tmemctl --server ADDR set-compress CLIENT|all on|off
    tmemctl --server ADDR flush KIB                 # give back KIB KiB of ephemeral pages (all clients)
    tmemctl --server ADDR auth CLIENT UUID [--revoke] | auth all [--revoke]
    tmemctl --server ADDR save CLIENT FILE [--live] [--seal KEYFILE]
    tmemctl --server ADDR restore CLIENT FILE [--convert] [--verify KEYFILE]

A migration is ``save --live`` on one tmemd and ``restore`` on another. ``restore`` checks
everything it can before it changes anything: the seal (with --verify), then the whole stream;
the server then restores it as one transaction (TMEMC_RESTORE_STREAM_*, docs/stream-format.md),
so a refused or failed restore leaves the server as it was.

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
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

from . import abi, savestream, seal
from .errors import EFROZEN, StreamError
from .sizes import parse_seconds

EXIT_OK = 0
EXIT_DATA = 1
EXIT_USAGE = 2
LIST_BUFFER = 1 << 20
RESTORE_CHUNK = 256 << 10  # per request, well under the wire's 1 MiB buffer limit
MESSAGE_BUFFER = 1024  # the restore commit's one-line reason comes back in here
ALL = abi.CLI_ID_NULL  # "all clients" in control ops, spelled ``all`` on the command line
U32_MAX = 0xFFFFFFFF


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


def client_or_all(text: str) -> int:
    """A client id, or ``all`` (CLI_ID_NULL: the op applies to every client, as xl's -a)."""
    if text == "all":
        return ALL
    try:
        return client_id(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a client id in 0..{abi.CLI_ID_NULL - 1} or 'all', got {text!r}") from None


def u32(text: str) -> int:
    """A non-negative 32-bit integer (weights, caps, KiB counts: the control record's arg1)."""
    if not text.isdigit() or int(text) > U32_MAX:
        raise argparse.ArgumentTypeError(f"must be an integer in 0..{U32_MAX}, got {text!r}")
    return int(text)


def shared_uuid(text: str) -> tuple[int, int]:
    """A UUID as Xen's (uuid[0] "lo", uuid[1] "hi"): libxc puts the first 16 hex digits in hi."""
    try:
        value = uuidlib.UUID(text).int
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a UUID such as 01234567-89ab-cdef-0123-456789abcdef, got {text!r}") from None
    if value == (1 << 128) - 1:
        raise argparse.ArgumentTypeError("the all-ones UUID marks an empty authorization slot and names no pool")
    return value & ((1 << 64) - 1), value >> 64


def uuid_text(pair: tuple[int, int]) -> str:
    return str(uuidlib.UUID(int=pair[1] << 64 | pair[0]))


# ====================================================================== parser


CLIENT_HELP = "client (domain) id 0..65534, or 'all'"


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        prog="tmemctl",
        description="Inspect, convert and seal tmem save streams; run the control ops of a running tmemd. "
        "A migration: 'save CLIENT F --live --seal KEY' on one server, 'restore CLIENT F --verify KEY' on "
        "another. A sealed stream is the unchanged libxc stream in an HMAC-SHA256 envelope; restore --verify "
        "refuses any changed or truncated byte before touching the server (docs/stream-format.md).",
        epilog="Seal format 1: 'TMEMSEAL', u16 version, u16 algorithm (1 = HMAC-SHA256), 8-byte key id, "
        "u64 length, the libxc stream, then HMAC-SHA256 over all of that (32 bytes). Key files: one line "
        "'tmemseal-key-v1 <64 hex digits>', made by 'tmemctl keygen FILE' with mode 0600; a key file that "
        "group or others may access is refused, as ssh refuses such private keys. "
        "Exit status: 0 ok, 1 bad data or a failed operation, 2 bad usage, 130 interrupted, 141 output "
        "reader gone.",
    )
    parser.add_argument("--server", metavar="ADDR",
                        help="tmemd address: unix:PATH or tcp:HOST:PORT (default: none; every command but "
                             "stream and keygen needs it)")
    parser.add_argument("--timeout", type=positive_seconds, default=2.0,
                        help="seconds per server request (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=UsageParser)
    _add_stream_commands(commands)
    keygen = commands.add_parser("keygen", help="write a new random seal key (256 bits) to FILE, mode 0600")
    keygen.add_argument("file", type=Path, metavar="FILE", help="key file to create (never overwritten)")
    _add_server_commands(commands)
    return parser


def _add_stream_commands(commands: Any) -> None:
    stream = commands.add_parser("stream", help="work on save-stream files (no server needed)")
    actions = stream.add_subparsers(dest="stream_command", required=True, metavar="ACTION", parser_class=UsageParser)
    inspect = actions.add_parser("inspect", help="show what a stream (sealed or not) holds")
    inspect.add_argument("file", type=Path, help="stream file (libxc's -5 marker or a TMEMSEAL envelope)")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text (default: text)")
    inspect.add_argument("--verify", type=Path, metavar="KEYFILE",
                         help="check a sealed stream's seal with this key first (default: none; the seal is "
                              "then reported as not verified)")
    conv = actions.add_parser("convert", help="rewrite a stream as v0 or v1")
    conv.add_argument("--to", required=True, choices=("v0", "v1"), help="target spec version (required)")
    conv.add_argument("input", type=Path, metavar="IN")
    conv.add_argument("output", type=Path, metavar="OUT")
    for name, text in (("seal", "wrap a libxc stream in an HMAC-SHA256 envelope"),
                       ("unseal", "verify a sealed stream and write the libxc stream inside")):
        sub = actions.add_parser(name, help=text)
        sub.add_argument("--key", type=Path, required=True, metavar="KEYFILE", help="seal key (required)")
        sub.add_argument("input", type=Path, metavar="IN")
        sub.add_argument("output", type=Path, metavar="OUT")
    verify = actions.add_parser("verify", help="check a sealed stream: its seal, then the stream inside")
    verify.add_argument("--key", type=Path, required=True, metavar="KEYFILE", help="seal key (required)")
    verify.add_argument("file", type=Path, metavar="FILE")


def _add_server_commands(commands: Any) -> None:
    listing = commands.add_parser("list", help="TMEMC_LIST of all clients")
    listing.add_argument("--long", action="store_true",
                         help="long format: also the second key group of each line (default: short)")
    listing.add_argument("--json", action="store_true",
                         help="JSON keyed by Xen's counter names, as Tmem.stats(); always the long form "
                              "(default: LIST text)")
    for name, text in (("freeze", "freeze a client (new puts fail)"), ("thaw", "thaw a frozen client")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("client", type=client_or_all, help=CLIENT_HELP)
    for name, text in (("set-weight", "eviction weight (0 = none)"), ("set-cap", "cap (stored and listed only)")):
        sub = commands.add_parser(name, help=f"set a client's {text}")
        sub.add_argument("client", type=client_or_all, help=CLIENT_HELP)
        sub.add_argument("value", type=u32, metavar="N", help=f"0..{U32_MAX}")
    compress = commands.add_parser("set-compress", help="turn a client's page compression on or off")
    compress.add_argument("client", type=client_or_all, help=CLIENT_HELP)
    compress.add_argument("state", choices=("on", "off"))
    flush = commands.add_parser("flush", help="TMEMC_FLUSH: give back ephemeral memory (all clients)")
    flush.add_argument("kib", type=u32, metavar="KIB", help="KiB to free, rounded up to whole 4 KiB pages")
    auth = commands.add_parser("auth", help="TMEM_AUTH: let a client join the shared pool UUID (or revoke it)")
    auth.add_argument("client", type=client_or_all,
                      help="client id; 'all' (no UUID) sets the global switch: every client may join every pool")
    auth.add_argument("uuid", type=shared_uuid, nargs="?", metavar="UUID", help="the shared pool's UUID")
    auth.add_argument("--revoke", action="store_true", help="de-authorize instead (default: authorize)")
    save = commands.add_parser("save", help="save a client's tmem to a stream file")
    save.add_argument("client", type=client_id, help="client (domain) id, 0..65534")
    save.add_argument("file", type=Path, help="output stream file (written atomically)")
    save.add_argument("--live", action="store_true",
                      help="live save: also write the extra section (default: off, a non-live save)")
    save.add_argument("--seal", type=Path, metavar="KEYFILE",
                      help="seal the stream with this key (default: none, a plain libxc stream)")
    restore = commands.add_parser("restore", help="recreate a client from a stream file, all or nothing")
    restore.add_argument("client", type=client_id, help="client (domain) id, 0..65534; must not exist yet")
    restore.add_argument("file", type=Path, help="stream file (or a pipe)")
    restore.add_argument("--convert", action="store_true",
                         help="convert a stream of a spec version the server does not take (default: refuse it)")
    restore.add_argument("--verify", type=Path, metavar="KEYFILE",
                         help="require a sealed stream and check its seal with this key (default: none; a "
                              "sealed stream is then refused)")


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
    if info.get("seal"):
        found = info["seal"]
        state = "verified" if found["verified"] else "NOT verified (give --verify KEYFILE)"
        lines.append(f"sealed: {found['algorithm']} (format {found['format_version']}), key id {found['key_id']}, {state}")
    return "\n".join(lines)


def read_input(path: Path) -> bytes:
    """All of ``path`` (a file, or a pipe such as /dev/stdin)."""
    with open(path, "rb") as source:
        return source.read()


def verified_stream(path: Path, data: bytes, keyfile: Path | None, *, required: bool) -> bytes:
    """The libxc stream in ``data``: unsealed with ``keyfile``'s key, or as is when it is not sealed.

    ``required`` (restore): a sealed stream needs a key and a key needs a sealed stream, so neither
    an unverified seal nor a stripped one gets through."""
    if keyfile is None:
        if required and seal.is_sealed(data):
            raise StreamError(f"{path} is sealed: give --verify KEYFILE to check and use it")
        return data
    key = seal.load_key(keyfile)
    if not seal.is_sealed(data):
        raise StreamError(f"{path} is not sealed (no TMEMSEAL header), so --verify cannot vouch for it")
    return seal.unseal(data, key)


def cmd_inspect(args: argparse.Namespace) -> int:
    data = read_input(args.file)
    sealed = seal.is_sealed(data)
    stream = verified_stream(args.file, data, args.verify, required=False)
    if sealed and args.verify is None:
        stream = seal.body_unverified(data)
    info = describe(savestream.decode_stream(stream), len(stream))
    info["seal"] = _seal_info(data, args.verify is not None) if sealed else None
    print(json.dumps(info, indent=2) if args.json else render(info))
    return EXIT_OK


def _seal_info(data: bytes, verified: bool) -> dict[str, Any]:
    header = seal.read_header(data)
    return {"format_version": header.version, "algorithm": header.algorithm_name,
            "key_id": header.key_id.hex(), "verified": verified}


def cmd_convert(args: argparse.Namespace) -> int:
    data = read_input(args.input)
    if seal.is_sealed(data):
        raise StreamError(f"{args.input} is sealed: unseal it first (tmemctl stream unseal --key KEYFILE IN OUT)")
    image = savestream.decode_stream(data)
    converted = savestream.convert(image, abi.SPEC_V0 if args.to == "v0" else abi.SPEC_V1)
    write_atomically(args.output, lambda out: savestream.write_stream(converted, out))
    print(f"{args.output}: v{image.version} -> v{converted.version}, {len(converted.pools)} pool(s)")
    return EXIT_OK


def cmd_seal(args: argparse.Namespace) -> int:
    key = seal.load_key(args.key)
    data = read_input(args.input)
    if seal.is_sealed(data):
        raise StreamError(f"{args.input} is sealed already")
    image = savestream.decode_stream(data)  # only a well-formed stream gets a seal that vouches for it
    sealed = seal.seal(data, key)
    write_atomically(args.output, lambda out: out.write(sealed))
    print(f"{args.output}: v{image.version} stream sealed, {len(sealed)} bytes, key id {seal.key_id(key).hex()}")
    return EXIT_OK


def cmd_unseal(args: argparse.Namespace) -> int:
    stream = verified_stream(args.input, read_input(args.input), args.key, required=True)
    image = savestream.decode_stream(stream)
    write_atomically(args.output, lambda out: out.write(stream))
    print(f"{args.output}: seal verified, v{image.version} libxc stream, {len(stream)} bytes")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    stream = verified_stream(args.file, read_input(args.file), args.key, required=True)
    image = savestream.decode_stream(stream)
    pages = sum(len(pool.pages) for pool in image.pools)
    print(f"{args.file}: seal ok, v{image.version} stream, {len(stream)} bytes, "
          f"{len(image.pools)} pool(s), {pages} persistent page(s)")
    return EXIT_OK


def cmd_keygen(args: argparse.Namespace) -> int:
    key = seal.generate_key_file(args.file)
    print(f"{args.file}: new seal key, key id {seal.key_id(key).hex()}, mode 0600. Keep it secret: whoever "
          "holds it can seal streams that restore --verify accepts.")
    return EXIT_OK


STREAM_COMMANDS = MappingProxyType(
    {"inspect": cmd_inspect, "convert": cmd_convert, "seal": cmd_seal, "unseal": cmd_unseal, "verify": cmd_verify}
)


def write_atomically(path: Path, write: Callable[[Any], Any]) -> None:
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
                buf: bytearray | None = None, oid: int = 0) -> int:
        record = abi.control_record(subop, cli_id, arg1=arg1, arg2=arg2, oid=oid, version=self.spec_version)
        return self.remote.do_tmem_op(record, buf)

    def do_tmem_op(self, client_id: int, op: bytes, page: bytearray | None = None) -> int:
        assert client_id == 0, "control ops are issued as client 0"
        return self.remote.do_tmem_op(op, page)

    def destroy_client(self, client_id: int) -> None:
        raise StreamError("destroying a client is not available over the wire")

    def close(self) -> None:
        self.remote.close()


def rc_text(rc: int) -> str:
    """A control op's failure code with its name (Xen answers -1 for "no such client")."""
    if rc == -1:
        return "-1 (no such client, or not permitted)"
    name = "EFROZEN" if rc == -EFROZEN else errno.errorcode.get(-rc, "?")
    return f"{rc} ({name})"


def who(client: int) -> str:
    return "all clients" if client == ALL else f"client {client}"


def cmd_list(args: argparse.Namespace, dom0: _Dom0) -> int:
    from .stats import parse_list_text

    buf = bytearray(LIST_BUFFER)
    rc = dom0.control(abi.TMEMC_LIST, arg1=len(buf), arg2=1 if args.long or args.json else 0, buf=buf)
    if rc < 0:
        return fail(f"LIST failed: {rc_text(rc)}", EXIT_DATA)
    text = bytes(buf).split(b"\0", 1)[0].decode("ascii", "replace")
    if len(text) + 1 >= LIST_BUFFER - 4096:  # LIST drops the lines that do not fit, silently
        print(f"tmemctl: LIST filled its {LIST_BUFFER}-byte buffer: later clients may be missing", file=sys.stderr)
    if args.json:
        try:
            print(json.dumps(parse_list_text(text), indent=2))
        except ValueError as exc:
            raise StreamError(str(exc)) from None
    else:
        print(text.rstrip("\n"))
    return EXIT_OK


def cmd_freeze_thaw(args: argparse.Namespace, dom0: _Dom0) -> int:
    subop = abi.TMEMC_FREEZE if args.command == "freeze" else abi.TMEMC_THAW
    rc = dom0.control(subop, args.client)
    if rc < 0:
        return fail(f"{args.command} {who(args.client)} failed: {rc_text(rc)}", EXIT_DATA)
    print(f"{who(args.client)}: {args.command} ok")
    return EXIT_OK


SETTERS = MappingProxyType({"set-weight": abi.TMEMC_SET_WEIGHT, "set-cap": abi.TMEMC_SET_CAP,
                            "set-compress": abi.TMEMC_SET_COMPRESS})


def cmd_set(args: argparse.Namespace, dom0: _Dom0) -> int:
    value = (1 if args.state == "on" else 0) if args.command == "set-compress" else args.value
    rc = dom0.control(SETTERS[args.command], args.client, arg1=value)
    if rc < 0:
        hint = " (a dedup host keeps compression off)" if args.command == "set-compress" else ""
        return fail(f"{args.command} {who(args.client)} failed: {rc_text(rc)}{hint}", EXIT_DATA)
    shown = args.state if args.command == "set-compress" else value
    print(f"{who(args.client)}: {args.command.removeprefix('set-')} {shown}")
    return EXIT_OK


def cmd_flush(args: argparse.Namespace, dom0: _Dom0) -> int:
    rc = dom0.control(abi.TMEMC_FLUSH, arg1=args.kib)
    if rc < 0:
        return fail(f"flush failed: {rc_text(rc)}", EXIT_DATA)
    print(f"flushed {rc} KiB of ephemeral pages (asked for {args.kib} KiB)")
    return EXIT_OK


def cmd_auth(args: argparse.Namespace, dom0: _Dom0) -> int:
    pair = args.uuid or (0, 0)
    record = abi.TmemOp(abi.TMEM_AUTH, 0, uuid=pair, flags=0 if args.revoke else 1, arg1=args.client)
    rc = dom0.remote.do_tmem_op(record.encode(dom0.spec_version))
    verb = "revoke" if args.revoke else "authorize"
    if rc < 0:
        reason = {-errno.EINVAL: " (no such client: a client exists from its first pool)",
                  -errno.ENOMEM: " (its 16 authorization slots are full)"}.get(rc, "")
        return fail(f"{verb} {who(args.client)} failed: {rc_text(rc)}{reason}", EXIT_DATA)
    if args.client == ALL:
        print(f"global shared-pool authorization {'off' if args.revoke else 'on: every client may join every pool'}")
    elif rc == 0:
        print(f"client {args.client} was not authorized for {uuid_text(pair)}: nothing to revoke")
    else:
        print(f"client {args.client}: {'no longer ' if args.revoke else ''}authorized for shared pool {uuid_text(pair)}")
    return EXIT_OK


def cmd_save(args: argparse.Namespace, dom0: _Dom0) -> int:
    image = savestream.snapshot_client(dom0, args.client, live=args.live)
    if image is None:
        return fail(f"client {args.client} has no tmem pools: nothing saved", EXIT_DATA)
    data = savestream.encode_stream(image)
    note = ""
    if args.key is not None:
        data = seal.seal(data, args.key)
        note = f", sealed (HMAC-SHA256, key id {seal.key_id(args.key).hex()})"
    write_atomically(args.file, lambda out: out.write(data))
    print(f"{args.file}: client {args.client}, v{image.version}, {len(data)} bytes{note}")
    return EXIT_OK


def cmd_restore(args: argparse.Namespace, dom0: _Dom0) -> int:
    image: savestream.ClientImage = args.image
    upload_stream(dom0, args.client, args.stream, args.convert)
    pages = sum(len(pool.pages) for pool in image.pools)
    note = ", seal verified" if args.verify is not None else ""
    print(f"client {args.client} restored from {args.file}: v{image.version} stream, {len(image.pools)} pool(s), "
          f"{pages} persistent page(s){note}")
    return EXIT_OK


def upload_stream(dom0: _Dom0, client: int, stream: bytes, convert: bool) -> None:
    """Send ``stream`` to the server in chunks and have it restore ``client`` from it in one
    transaction (TMEMC_RESTORE_STREAM_*); StreamError with the server's reason if it refuses."""
    token = dom0.control(abi.TMEMC_RESTORE_STREAM_BEGIN, client)
    if token == -errno.EEXIST:
        raise StreamError(f"client {client} already exists on the server: nothing restored")
    if token < 0:
        raise StreamError(f"the server cannot restore over the wire: RESTORE_STREAM_BEGIN answered {rc_text(token)}")
    try:
        for offset in range(0, len(stream), RESTORE_CHUNK):
            chunk = bytearray(stream[offset : offset + RESTORE_CHUNK])
            rc = dom0.control(abi.TMEMC_RESTORE_STREAM_DATA, client, arg1=len(chunk), arg2=token, oid=offset, buf=chunk)
            if rc < 0:
                hint = " (larger than this server could restore)" if rc == -errno.ENOMEM else ""
                raise StreamError(f"uploading the stream failed at byte {offset}: {rc_text(rc)}{hint}; nothing restored")
        message = bytearray(MESSAGE_BUFFER)
        flags = abi.RESTORE_STREAM_CONVERT if convert else 0
        rc = dom0.control(abi.TMEMC_RESTORE_STREAM_COMMIT, client, arg1=flags, arg2=token, oid=len(stream), buf=message)
    except BaseException:  # a refused chunk, a dead connection, Ctrl-C: do not leave the upload staged
        _abort_quietly(dom0, client, token)
        raise
    if rc < 0:
        reason = bytes(message).split(b"\0", 1)[0].decode("utf-8", "replace") or rc_text(rc)
        raise StreamError(reason)


def _abort_quietly(dom0: _Dom0, client: int, token: int) -> None:
    try:
        dom0.control(abi.TMEMC_RESTORE_STREAM_ABORT, client, arg2=token)
    except OSError:
        pass  # the server is gone or unreachable: its upload goes when it needs the room


def prepare(args: argparse.Namespace) -> None:
    """What a server command can check without the server, done before connecting, so bad input
    (a bad key file, a damaged or mis-sealed stream) never reaches it."""
    if args.command == "auth" and (args.client == ALL) != (args.uuid is None):
        raise UsageError("auth CLIENT needs a UUID; 'auth all' takes none (it sets the global switch)")
    if args.command == "save":
        args.key = seal.load_key(args.seal) if args.seal is not None else None
    elif args.command == "restore":
        args.stream = verified_stream(args.file, read_input(args.file), args.verify, required=True)
        args.image = savestream.decode_stream(args.stream)


SERVER_COMMANDS = MappingProxyType(
    {"list": cmd_list, "freeze": cmd_freeze_thaw, "thaw": cmd_freeze_thaw, "set-weight": cmd_set,
     "set-cap": cmd_set, "set-compress": cmd_set, "flush": cmd_flush, "auth": cmd_auth, "save": cmd_save,
     "restore": cmd_restore}
)


def run_server_command(args: argparse.Namespace) -> int:
    if not args.server:
        raise UsageError(f"'{args.command}' needs --server ADDR")
    from .wire import parse_address, unreachable

    parse_address(args.server)  # ValueError → usage error
    prepare(args)
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
        return STREAM_COMMANDS[args.stream_command](args)
    if args.command == "keygen":
        return cmd_keygen(args)
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
