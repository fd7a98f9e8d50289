"""tmemd: a tmem host serving remote guests over the wire protocol (tmemcore/wire.py).

    tmemd --listen tcp:127.0.0.1:0|unix:PATH --memory 64M [--accept-v0] [--spec v0|v1]
          [--dedup] [--tze] [--compress-default] [--ready-file PATH]

One thread accepts, one thread per connection answers requests in order (the host has its
own lock). Once listening, tmemd prints ``tmemd listening on ADDRESS`` on stdout and, with
``--ready-file``, writes ADDRESS there (atomically), so callers wait on it, not on a sleep.
SIGTERM/SIGINT stop it cleanly: no new connections, open ones are shut down, a unix socket
file is removed. A malformed frame closes that one connection with a log line on stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import stat
import sys
import threading
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from . import abi, wire
from .errors import TmemError

LOG = logging.getLogger("tmemd")
_SIZE_SUFFIXES = MappingProxyType({"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30})


class Host(Protocol):
    def do_tmem_op(self, client_id: int, op: bytes, page: bytearray | None = None) -> int: ...


class TmemServer:
    """Serve ``host`` on ``listen`` until ``stop()``; ``start()`` returns the bound address."""

    def __init__(self, host: Host, listen: str, max_connections: int = 64) -> None:
        self.host = host
        self.listen_address = wire.parse_address(listen)
        self.max_connections = max_connections
        self.address: str | None = None
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._connections: dict[socket.socket, threading.Thread] = {}
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
        try:
            with conn:
                if conn.family != socket.AF_UNIX:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                client_id = wire.decode_hello(wire.recv_frame(conn) or b"")
                wire.send_frame(conn, wire.encode_welcome(0))
                LOG.info("client %d connected", client_id)
                self._answer_requests(conn, client_id)
        except wire.ProtocolError as exc:
            LOG.warning("dropping a connection: malformed frame: %s", exc)
        except OSError as exc:
            if not self._stopping.is_set():
                LOG.info("connection ended: %s", exc)
        except Exception:  # a host bug must cost this connection, not the daemon
            LOG.exception("dropping a connection: the host raised")
        finally:
            with self._lock:
                self._connections.pop(conn, None)

    def _answer_requests(self, conn: socket.socket, client_id: int) -> None:
        while True:
            payload = wire.recv_frame(conn, allow_eof=True)
            if payload is None:
                LOG.info("client %d disconnected", client_id)
                return
            wire.send_frame(conn, answer(self.host, client_id, payload))


def answer(host: Host, client_id: int, payload: bytes) -> bytes:
    """The response to one request payload (ProtocolError if it is not a request)."""
    request = wire.decode_request(payload)
    rc = host.do_tmem_op(client_id, request.op, request.buffer)
    keep = request.buffer is not None and wire.host_wrote_buffer(request.op, rc)
    return wire.encode_response(rc, request.buffer if keep else None)


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


def parse_size(text: str) -> int:
    """Bytes from "64M", "4096", "1G", "512K" (binary units)."""
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    suffix = value[-1:] if value[-1:] in _SIZE_SUFFIXES else ""
    number = value[: len(value) - len(suffix)]
    if not number.isdigit():
        raise ValueError(f"bad size {text!r}: expected e.g. 4096, 512K, 64M, 1G")
    return int(number) * _SIZE_SUFFIXES[suffix]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tmemd",
        description="Serve a tmem host to remote guests (wire protocol: tmemcore/wire.py). "
        "No authentication: listen on loopback or a unix socket only.",
    )
    parser.add_argument("--listen", required=True, help="unix:PATH or tcp:HOST:PORT (port 0 picks a free one)")
    parser.add_argument("--memory", default="64M", help="host memory budget, e.g. 64M (default 64M)")
    parser.add_argument("--accept-v0", action="store_true", help="also accept spec v0 pools (a v1 host)")
    parser.add_argument("--spec", choices=("v0", "v1"), default="v1", help="host spec version (default v1)")
    parser.add_argument("--dedup", action="store_true", help="deduplicate ephemeral pages")
    parser.add_argument("--tze", action="store_true", help="trailing-zero elimination (with --dedup)")
    parser.add_argument("--compress-default", action="store_true", help="new clients compress their pages")
    parser.add_argument("--ready-file", type=Path, help="write the bound address here once listening")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


def build_host(args: argparse.Namespace) -> Any:
    from .tmem import Tmem

    pages = parse_size(args.memory) // abi.PAGE_SIZE
    if pages < 1:
        raise ValueError(f"--memory {args.memory} is less than one page")
    options: dict[str, Any] = {
        "memory_pages": pages,
        "accept_v0": args.accept_v0,
        "spec_version": abi.SPEC_V0 if args.spec == "v0" else abi.SPEC_V1,
    }
    if args.dedup:
        options["dedup"] = True
    if args.tze:
        options["tze"] = True
    if args.compress_default:
        options["compress"] = True
    return Tmem(**options)


def write_ready_file(path: Path, address: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(address + "\n")
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level, format="tmemd: %(levelname)s %(message)s")
    try:
        server = TmemServer(build_host(args), args.listen)
        address = server.start()
    except (ValueError, TmemError, OSError) as exc:  # bad --listen/--memory, or the address is taken
        print(f"tmemd: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, (ValueError, TmemError)) else 1
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(f"tmemd listening on {address}", flush=True)
    if args.ready_file:
        write_ready_file(args.ready_file, address)
    while not stop.wait(1.0):  # the timeout only keeps the main thread responsive to signals
        pass
    LOG.info("shutting down")
    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
