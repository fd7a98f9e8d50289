"""tmemd: a tmem host serving remote guests over the wire protocol (tmemcore/wire.py).

    tmemd --listen tcp:127.0.0.1:0|unix:PATH --memory 64M [--accept-v0] [--spec v0|v1]
          [--dedup [--tze]] [--compress-default] [--ready-file PATH]

One thread accepts, one thread per connection answers requests in order (the host has its
own lock). Once listening, tmemd prints ``tmemd listening on ADDRESS`` on stdout and, with
``--ready-file``, writes ADDRESS there (atomically), so callers wait on it, not on a sleep.
SIGTERM/SIGINT stop it cleanly: no new connections, open ones are shut down, a unix socket
file is removed. A malformed frame closes that one connection with a log line on stderr, and so
does silence: a connection must send its hello within HELLO_TIMEOUT (5 s). A save (SAVE_BEGIN ..
SAVE_END) that its connection leaves open is ended when the connection closes; a SAVE_BEGIN for a
client whose save is already open gets -EBUSY.

A connection is a guest: a hello for ``wire.CLIENT_ANY`` gets the lowest client id >= 1 no
open connection speaks for, and when the connection ends -- however it ends -- the pools it
created with NEW_POOL are destroyed (DESTROY_POOL as that client), as Xen destroys a dying
domain's pools. So a guest killed with SIGKILL leaks nothing.

Exit status: 0 after SIGTERM/SIGINT, 1 cannot listen (the message names the address), 2 bad
usage (one line: unknown or contradictory options, bad address or size).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import stat
import struct
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from . import abi, wire
from .cli import UsageError, UsageParser
from .errors import TmemError
from .sizes import parse_size, size_to_pages

LOG = logging.getLogger("tmemd")
# Seconds a new connection has to send its hello. Guests and tmemctl send it at once; without a
# limit, max_connections sockets that never speak would lock every later guest out for good.
HELLO_TIMEOUT = 5.0
_CMD_POOL = struct.Struct("<Ii")  # cmd, pool_id: the same offsets in v0 and v1 records


class Host(Protocol):
    def do_tmem_op(self, client_id: int, op: bytes, page: bytearray | None = None) -> int: ...


class TmemServer:
    """Serve ``host`` on ``listen`` until ``stop()``; ``start()`` returns the bound address."""

    def __init__(self, host: Host, listen: str, max_connections: int = 64, hello_timeout: float = HELLO_TIMEOUT) -> None:
        self.host = host
        self.listen_address = wire.parse_address(listen)
        self.max_connections = max_connections
        self.hello_timeout = hello_timeout
        self.address: str | None = None
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._client_ids: dict[socket.socket, int] = {}  # the client each connection speaks for
        self._saves = SaveRegistry()
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> str:
        self._listener = self._bind()
        self.address = wire.address_of(self._listener)
        self._accept_thread = threading.Thread(target=self._accept_loop, name="tmemd-accept", daemon=True)
        self._accept_thread.start()
        LOG.info("listening on %s", self.address)
        return self.address

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._listener is not None:
            _shutdown_quietly(self._listener)
            self._listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        with self._lock:
            connections = list(self._connections.items())
        for sock, _ in connections:
            _shutdown_quietly(sock)
        for _, thread in connections:
            thread.join(timeout)
        if self.listen_address.family == socket.AF_UNIX:
            Path(str(self.listen_address.sockaddr)).unlink(missing_ok=True)

    def connection_count(self) -> int:
        with self._lock:
            return len(self._connections)

    def check(self) -> None:
        with self._lock:
            assert len(self._connections) <= self.max_connections
            assert all(thread.is_alive() or sock.fileno() == -1 for sock, thread in self._connections.items())
            assert set(self._client_ids) <= set(self._connections)
            assert all(0 <= cid <= wire.MAX_CLIENT_ID for cid in self._client_ids.values())

    def client_ids(self) -> dict[int, int]:
        """How many open connections speak for each client id."""
        with self._lock:
            counts: dict[int, int] = {}
            for cid in self._client_ids.values():
                counts[cid] = counts.get(cid, 0) + 1
            return counts

    # ------------------------------------------------------------------ sockets

    def _bind(self) -> socket.socket:
        address = self.listen_address
        if address.family == socket.AF_UNIX:
            _remove_stale_unix_socket(str(address.sockaddr))
        sock = socket.socket(address.family, socket.SOCK_STREAM)
        try:
            if address.family != socket.AF_UNIX:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address.sockaddr)
            sock.listen(16)
        except OSError:
            sock.close()
            raise
        return sock

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                LOG.exception("accept failed; tmemd stops accepting")
                return
            self._admit(conn)

    def _admit(self, conn: socket.socket) -> None:
        with self._lock:
            if len(self._connections) >= self.max_connections:
                LOG.warning("refusing a connection: %d connections open", len(self._connections))
                conn.close()
                return
            thread = threading.Thread(target=self._serve_connection, args=(conn,), name="tmemd-conn", daemon=True)
            self._connections[conn] = thread
            thread.start()  # under the lock, so check() never sees a registered thread not yet started

    def _serve_connection(self, conn: socket.socket) -> None:
        guest: Guest | None = None
        try:
            with conn:
                if conn.family != socket.AF_UNIX:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                try:
                    requested = wire.recv_hello(conn, self.hello_timeout)
                except TimeoutError:
                    LOG.warning("dropping a connection: no hello within %g s", self.hello_timeout)
                    return
                client_id = self._claim_client_id(conn, requested)
                if client_id is None:
                    LOG.warning("refusing a connection: no free client id")
                    wire.send_frame(conn, wire.encode_welcome(-errno.ENOSPC, 0))
                    return
                guest = Guest(self.host, client_id, self._saves)
                wire.send_frame(conn, wire.encode_welcome(0, client_id if requested == wire.CLIENT_ANY else None))
                LOG.info("client %d connected%s", client_id, " (assigned)" if requested == wire.CLIENT_ANY else "")
                self._answer_requests(conn, guest)
        except wire.ProtocolError as exc:
            LOG.warning("dropping a connection: malformed frame: %s", exc)
        except OSError as exc:
            if not self._stopping.is_set():
                LOG.info("connection ended: %s", exc)
        except Exception:  # a host bug must cost this connection, not the daemon
            LOG.exception("dropping a connection: the host raised")
        finally:
            if guest is not None:
                self._end_guest(guest)
            with self._lock:
                self._connections.pop(conn, None)
                self._client_ids.pop(conn, None)

    def _claim_client_id(self, conn: socket.socket, requested: int) -> int | None:
        """The id this connection speaks for: ``requested``, or for CLIENT_ANY the lowest free one."""
        with self._lock:
            if requested != wire.CLIENT_ANY:
                self._client_ids[conn] = requested
                return requested
            taken = set(self._client_ids.values())
            free = next((cid for cid in range(1, wire.MAX_CLIENT_ID + 1) if cid not in taken), None)
            if free is not None:
                self._client_ids[conn] = free
            return free

    def _end_guest(self, guest: Guest) -> None:
        """The connection is gone: end the saves it left open and destroy the pools it created (a dead
        domain's pools die with it)."""
        for level, what, cleanup in ((logging.WARNING, "ended the unfinished save(s) of client(s)", guest.end_saves),
                                     (logging.INFO, "destroyed pool(s)", guest.destroy_pools)):
            try:
                done = cleanup()
            except Exception:  # the host failing here must not take the daemon down; the log keeps the reason
                LOG.exception("client %d: cleaning up after the closed connection failed", guest.client_id)
                continue
            if done:
                LOG.log(level, "client %d: %s %s of the closed connection", guest.client_id, what, done)

    def _answer_requests(self, conn: socket.socket, guest: Guest) -> None:
        while True:
            payload = wire.recv_frame(conn, allow_eof=True)
            if payload is None:
                LOG.info("client %d disconnected", guest.client_id)
                return
            wire.send_frame(conn, guest.answer(payload))


class Guest:
    """One connection's client: answers its requests and remembers the pools it created."""

    def __init__(self, host: Host, client_id: int, saves: "SaveRegistry | None" = None) -> None:
        self.host = host
        self.client_id = client_id
        self.pools: dict[int, int] = {}  # pool id -> record version (spec) it was created with
        self.saves = saves if saves is not None else SaveRegistry()

    def answer(self, payload: bytes) -> bytes:
        """The response to one request payload (ProtocolError if it is not a request)."""
        request = wire.decode_request(payload)
        save = _save_subop(request.op)
        if save is None:
            rc = self.host.do_tmem_op(self.client_id, request.op, request.buffer)
        else:
            rc = self.saves.run(self, *save, lambda: self.host.do_tmem_op(self.client_id, request.op, request.buffer))
        self._track(request.op, rc)
        keep = request.buffer is not None and wire.host_wrote_buffer(request.op, rc)
        return wire.encode_response(rc, request.buffer if keep else None)

    def _track(self, op: bytes, rc: int) -> None:
        if len(op) < _CMD_POOL.size:
            return
        cmd, pool_id = _CMD_POOL.unpack_from(op)
        if cmd == abi.TMEM_NEW_POOL and rc >= 0:
            self.pools[rc] = abi.version_of_record(op)
        elif cmd == abi.TMEM_DESTROY_POOL:
            self.pools.pop(pool_id, None)

    def end_saves(self) -> list[int]:
        """SAVE_END every save this connection began and left open (its client thaws, stops live-migrating)."""
        return self.saves.end_all(self, lambda record: self.host.do_tmem_op(self.client_id, record))

    def destroy_pools(self) -> list[int]:
        """DESTROY_POOL every pool this connection created; the ids the host destroyed."""
        destroyed = []
        for pool_id, version in sorted(self.pools.items()):
            record = abi.gen_record(abi.TMEM_DESTROY_POOL, pool_id, 0, 0, version)
            if self.host.do_tmem_op(self.client_id, record) > 0:
                destroyed.append(pool_id)
        self.pools.clear()
        return destroyed

    def check(self) -> None:
        assert all(0 <= pool_id < abi.MAX_POOLS_PER_DOMAIN for pool_id in self.pools), self.pools


class SaveRegistry:
    """The saves open on a server: client id -> (the connection that began it, record version).

    A save leaves its client frozen (and live-migrating) until SAVE_END, which a tool that dies or
    times out mid-save never sends: the connection's end sends it instead, for the saves that
    connection still owns. A SAVE_BEGIN for a client whose save is already open gets -EBUSY
    (a second one would also record the first's freeze as the client's own); any connection's
    SAVE_END ends a save."""

    def __init__(self) -> None:
        self._open: dict[int, tuple[Guest, int]] = {}
        self._lock = threading.Lock()

    def run(self, guest: "Guest", subop: int, cli_id: int, version: int, call: Callable[[], int]) -> int:
        """``call()`` (the host's answer to this SAVE_BEGIN/SAVE_END), with the registry kept in step."""
        with self._lock:  # held across the host call: two SAVE_BEGINs for one client cannot interleave
            if subop == abi.TMEMC_SAVE_BEGIN and cli_id in self._open:
                return -errno.EBUSY
            rc = call()
            if subop == abi.TMEMC_SAVE_BEGIN and rc == 1:
                self._open[cli_id] = (guest, version)
            elif subop == abi.TMEMC_SAVE_END:
                self._open.pop(cli_id, None)
            return rc

    def end_all(self, guest: "Guest", call: Callable[[bytes], int]) -> list[int]:
        """SAVE_END (via ``call(record)``) each save ``guest`` began and left open; their client ids."""
        with self._lock:
            mine = sorted((cli_id, version) for cli_id, (owner, version) in self._open.items() if owner is guest)
            for cli_id, version in mine:
                del self._open[cli_id]
                call(abi.control_record(abi.TMEMC_SAVE_END, cli_id, version=version))
        return [cli_id for cli_id, _ in mine]


def _save_subop(op: bytes) -> tuple[int, int, int] | None:
    """(subop, client id, record version) of a SAVE_BEGIN or SAVE_END control record, else None."""
    if len(op) < _CMD_POOL.size or _CMD_POOL.unpack_from(op)[0] != abi.TMEM_CONTROL:
        return None
    try:
        record = abi.TmemOp.decode(op)
    except (TmemError, ValueError, struct.error):
        return None  # malformed: the host refuses it
    if record.subop not in (abi.TMEMC_SAVE_BEGIN, abi.TMEMC_SAVE_END):
        return None
    return record.subop, record.cli_id, abi.version_of_record(op)


def answer(host: Host, client_id: int, payload: bytes) -> bytes:
    """The response to one request payload of a connection that creates no pools (stateless)."""
    return Guest(host, client_id).answer(payload)


def _shutdown_quietly(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed or never connected: nothing left to shut down


def _remove_stale_unix_socket(path: str) -> None:
    """Unlink ``path`` if it is a socket nobody listens on; refuse to clobber anything else."""
    if not os.path.lexists(path):
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(f"{path}: another server is listening there")


# ====================================================================== command line


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        prog="tmemd",
        description="Serve a tmem host to remote guests (wire protocol: tmemcore/wire.py). "
        "No authentication: listen on loopback or a unix socket only. A guest's pools are destroyed "
        "when its connection closes.",
    )
    parser.add_argument("--listen", required=True,
                        help="unix:PATH or tcp:HOST:PORT, port 0 picks a free one (required, no default)")
    parser.add_argument("--memory", default="64M", help="host memory budget, K/M/G/T or bytes, at most 1T "
                        "(default: %(default)s)")
    parser.add_argument("--accept-v0", action="store_true",
                        help="a v1 host that also accepts spec v0 pools (default: off; not with --spec v0)")
    parser.add_argument("--spec", choices=("v0", "v1"), default="v1", help="host spec version (default: %(default)s)")
    parser.add_argument("--dedup", action="store_true",
                        help="deduplicate ephemeral pages (default: off; not with --compress-default)")
    parser.add_argument("--tze", action="store_true",
                        help="trailing-zero elimination of deduplicated pages (default: off; needs --dedup)")
    parser.add_argument("--compress-default", action="store_true",
                        help="new clients compress their pages (default: off; not with --dedup)")
    parser.add_argument("--store", default="memory",
                        help="where ephemeral page bytes live: memory, or memcached://HOST:PORT "
                        "(a lost page is a miss; not with --dedup) (default: %(default)s)")
    parser.add_argument("--ready-file", type=Path,
                        help="write the bound address here once listening (default: none)")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="stderr log level (default: %(default)s)")
    return parser


def check_flags(args: argparse.Namespace) -> None:
    """Refuse combinations the host would silently ignore (UsageError, one line)."""
    if args.tze and not args.dedup:
        raise UsageError("--tze needs --dedup (trailing-zero elimination works on deduplicated pages)")
    if args.dedup and args.compress_default:
        raise UsageError("--compress-default and --dedup exclude each other (a dedup host refuses compression)")
    if args.accept_v0 and args.spec == "v0":
        raise UsageError("--accept-v0 is for a v1 host; a --spec v0 host accepts only v0")


def build_host(args: argparse.Namespace) -> Any:
    from .tmem import Tmem

    pages = size_to_pages(parse_size(args.memory))  # rounded up, as guestfs mount --tmem does
    if pages < 1:
        raise UsageError(f"--memory must be at least 1 byte (rounded up to whole {abi.PAGE_SIZE}-byte pages), "
                         f"got {args.memory!r}")
    return Tmem(memory_pages=pages, accept_v0=args.accept_v0,
                spec_version=abi.SPEC_V0 if args.spec == "v0" else abi.SPEC_V1,
                dedup=args.dedup, tze=args.tze, compress=args.compress_default,
                store=args.store)


def check_ready_file(path: Path) -> None:
    """Refuse, before listening, a --ready-file that could not be written (UsageError, one line)."""
    directory = path.parent
    if path.is_dir() or not directory.is_dir() or not os.access(directory, os.W_OK | os.X_OK):
        what = "is a directory" if path.is_dir() else f"{directory} is not a writable directory"
        raise UsageError(f"--ready-file {path}: {what}")


def write_ready_file(path: Path, address: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(address + "\n")
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        check_flags(args)
        if args.ready_file:
            check_ready_file(args.ready_file)
        host = build_host(args)
        server = TmemServer(host, args.listen)
    except (ValueError, TmemError) as exc:  # bad usage, --listen or --memory
        print(f"tmemd: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(stream=sys.stderr, level=args.log_level, format="tmemd: %(levelname)s %(message)s")
    try:
        address = server.start()
    except OSError as exc:  # the directory is missing, the address is taken, ...
        print(f"tmemd: cannot listen on {server.listen_address}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(f"tmemd listening on {address}", flush=True)
    try:
        if args.ready_file:
            try:
                write_ready_file(args.ready_file, address)
            except OSError as exc:  # checked before listening; the directory changed since
                print(f"tmemd: cannot write --ready-file {args.ready_file}: {exc.strerror or exc}", file=sys.stderr)
                return 1
        while not stop.wait(1.0):  # the timeout only keeps the main thread responsive to signals
            pass
        LOG.info("shutting down")
        return 0
    finally:
        server.stop()
        if args.ready_file:  # a stale address file would send the next caller to a dead server
            args.ready_file.unlink(missing_ok=True)


if __name__ == "__main__":
    raise SystemExit(main())
