"""tmemd: a tmem host serving remote guests over the wire protocol (tmemcore/wire.py).

    tmemd --listen unix:PATH [--socket-mode 0660] [--group GROUP]
    tmemd --listen tcp:HOST:PORT --tls-cert FILE --tls-key FILE --tls-ca FILE [--tls-control-subject SUBJECT]...
    tmemd --listen tcp:127.0.0.1:PORT --insecure-tcp
          [--memory 64M] [--accept-v0] [--spec v0|v1] [--dedup [--tze]] [--compress-default]
          [--shared-auth] [--max-connections N] [--max-per-principal N] [--max-control N] [--ready-file PATH]

Who may do what is docs/trust-model.md; tmemcore/trust.py holds the rules. In short: identity comes
from the transport (a unix peer's uid, a TLS peer's certificate subject), control connections
(client 0) are for control principals only, a client id one principal holds is refused to every
other, and with ``--shared-auth`` a guest joins a shared pool only after TMEM_AUTH from a control
connection.

One thread accepts, one thread per connection answers requests in order (the host has its
own lock). Once listening, tmemd prints ``tmemd listening on ADDRESS`` on stdout and, with
``--ready-file``, writes ADDRESS there (atomically), so callers wait on it, not on a sleep.
SIGTERM/SIGINT stop it cleanly: no new connections, open ones are shut down, a unix socket
file is removed. SIGUSR1 runs the host's and the server's invariant checks and logs the outcome.
A malformed frame closes that one connection with a log line on stderr, and so does silence: a
connection must finish its TLS handshake and send its hello within 5 s. A save (SAVE_BEGIN ..
SAVE_END) that its connection leaves open is ended when the connection closes; a SAVE_BEGIN for a
client whose save is already open gets -EBUSY.

A connection is a guest: a hello for ``wire.CLIENT_ANY`` gets the lowest client id >= 1 that no
connection holds and the host has no pools for, and when the connection ends -- however it ends --
the pools it created with NEW_POOL are destroyed (DESTROY_POOL as that client), as Xen destroys a
dying domain's pools; when the last connection holding an id ends, the shared-pool grants made for
that id through this server are revoked (Xen's grants die with the domain). So a guest killed with
SIGKILL leaks nothing, and the next holder of its id inherits nothing.

Exit status: 0 after SIGTERM/SIGINT, 1 cannot listen (the message names the address), 2 bad
usage (one line: unknown or contradictory options, bad address, size or TLS file).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import errno
import grp
import logging
import os
import signal
import socket
import ssl
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from . import abi, wire
from .cli import UsageError, UsageParser
from .client import uuid_text
from .errors import TmemError
from .sizes import parse_size, size_to_pages
from .trust import (
    INSECURE_TCP,
    Admission,
    Connection,
    Limits,
    ServerTls,
    default_control_uids,
    normalize_subject,
    peer_credentials,
    shutdown,
    unix_principal,
)

LOG = logging.getLogger("tmemd")
# Seconds a new connection has for its TLS handshake and hello together. Guests and tmemctl send the
# hello at once; a pending connection also gives way to newer ones (trust.Limits), so silence costs
# nobody else a slot even for these seconds.
HELLO_TIMEOUT = 5.0
# The kernel caps this at net.core.somaxconn; a short queue (16) refused connects during a burst of guests.
LISTEN_BACKLOG = 1024
DEFAULT_SOCKET_MODE = 0o660
# TCP keep-alive on welcomed connections: a guest whose machine vanished is noticed in ~2 minutes
# (60 s idle, then 6 probes 10 s apart), while a guest that is merely idle keeps its connection and pools.
KEEPALIVE = ((socket.TCP_KEEPIDLE, 60), (socket.TCP_KEEPINTVL, 10), (socket.TCP_KEEPCNT, 6))
_CMD_POOL = struct.Struct("<Ii")  # cmd, pool_id: the same offsets in v0 and v1 records
_ACCEPT_RETRY = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Host(Protocol):
    def do_tmem_op(self, client_id: int, op: bytes, page: bytearray | None = None) -> int: ...


class TmemServer:
    """Serve ``host`` on ``listen`` until ``stop()``; ``start()`` returns the bound address.

    A unix socket authenticates peers by uid (``control_uids`` may open control connections; default
    root and our own uid); TCP needs ``tls`` (client certificates) or ``insecure_tcp`` (127.0.0.1 only,
    every peer a control principal). ``max_connections`` and ``hello_timeout`` are shorthands for
    ``Limits.guests`` and ``Limits.hello_timeout``."""

    def __init__(
        self,
        host: Host,
        listen: str,
        max_connections: int | None = None,
        hello_timeout: float | None = None,
        *,
        limits: Limits | None = None,
        tls: ServerTls | None = None,
        insecure_tcp: bool = False,
        socket_mode: int = DEFAULT_SOCKET_MODE,
        socket_group: int | None = None,
        control_uids: frozenset[int] | None = None,
    ) -> None:
        self.host = host
        self.listen_address = wire.parse_address(listen)
        limits = limits or Limits(hello_timeout=HELLO_TIMEOUT)
        if max_connections is not None:
            limits = dataclasses.replace(limits, guests=max_connections)
        if hello_timeout is not None:
            limits = dataclasses.replace(limits, hello_timeout=hello_timeout)
        self.limits = limits
        check_transport(self.listen_address, tls, insecure_tcp)
        self.tls = tls
        self._tls_context = None if tls is None else tls.server_context()
        self.insecure_tcp = insecure_tcp
        self.socket_mode = socket_mode
        self.socket_group = socket_group
        self.control_uids = default_control_uids() if control_uids is None else control_uids
        self.admission = Admission(limits)
        self.address: str | None = None
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._threads: dict[Connection, threading.Thread] = {}
        self._saves = SaveRegistry()
        self._grants = GrantLedger()
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> str:
        self._listener = self._bind()
        self.address = wire.address_of(self._listener)
        self._accept_thread = threading.Thread(target=self._accept_loop, name="tmemd-accept", daemon=True)
        self._accept_thread.start()
        LOG.info("listening on %s (%s)", self.address, self.describe_transport())
        if self.insecure_tcp:
            LOG.warning("INSECURE: --insecure-tcp: %s has no authentication; every local process may connect "
                        "as dom0 (client 0, every control op) and as any guest", self.address)
        return self.address

    def describe_transport(self) -> str:
        if self.listen_address.family == socket.AF_UNIX:
            group = "" if self.socket_group is None else f", group {self.socket_group}"
            return f"unix peers by uid, control uids {sorted(self.control_uids)}, mode {self.socket_mode:04o}{group}"
        if self.tls is not None:
            subjects = ", ".join(sorted(self.tls.control_subjects)) or "none"
            return f"TLS with client certificates, control subjects: {subjects}"
        return "plain TCP without authentication"

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._listener is not None:
            shutdown(self._listener)
            self._listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        for conn in self.admission.connections():
            shutdown(conn.sock)
        with self._lock:
            threads = list(self._threads.values())
        for thread in threads:
            thread.join(timeout)
        if self.listen_address.family == socket.AF_UNIX:
            Path(str(self.listen_address.sockaddr)).unlink(missing_ok=True)

    def connection_count(self) -> int:
        """Open connections: pending ones (no hello answered yet) and welcomed ones."""
        return len(self.admission.connections())

    def check(self) -> None:
        self.admission.check()
        with self._lock:
            assert all(thread.is_alive() or conn.sock.fileno() == -1 for conn, thread in self._threads.items())
            assert len(self._threads) <= self.limits.pending + self.limits.guests + self.limits.control
        self._grants.check()

    def client_ids(self) -> dict[int, int]:
        """How many welcomed connections speak for each client id (0: control connections)."""
        return self.admission.client_ids()

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
            if address.family == socket.AF_UNIX:
                # before listen(): until then a connect is refused, so the umask's mode is never usable
                path = str(address.sockaddr)
                os.chmod(path, self.socket_mode)
                if self.socket_group is not None:
                    os.chown(path, -1, self.socket_group)
            sock.listen(LISTEN_BACKLOG)
        except OSError:
            sock.close()
            if address.family == socket.AF_UNIX and os.path.exists(str(address.sockaddr)):
                os.unlink(str(address.sockaddr))
            raise
        return sock

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                raw, peer = self._listener.accept()
            except OSError as exc:
                if self._stopping.is_set():
                    return
                if exc.errno in _ACCEPT_RETRY:  # out of descriptors or memory: others may free some
                    LOG.warning("accept failed (%s); retrying in 0.1 s", exc.strerror or exc)
                    self._stopping.wait(0.1)
                    continue
                if exc.errno == errno.ECONNABORTED:
                    continue
                LOG.exception("accept failed; tmemd stops accepting")
                return
            try:
                self._admit(raw, peer)
            except OSError as exc:  # the peer is already gone (its credentials unreadable)
                LOG.info("dropping a connection at accept: %s", exc)
                raw.close()

    def _admit(self, raw: socket.socket, peer: Any) -> None:
        if self.listen_address.family == socket.AF_UNIX:
            pid, uid, _gid = peer_credentials(raw)
            principal = unix_principal(uid, self.control_uids)
            conn = Connection(raw, f"uid {uid} pid {pid}", str(principal), principal)
        else:
            conn = Connection(raw, f"tcp {peer[0]}:{peer[1]}", str(peer[0]),
                              INSECURE_TCP if self.insecure_tcp else None)
        exempt = conn.principal is not None and conn.principal.control
        for victim in self.admission.admit(conn, exempt=exempt):
            LOG.warning("dropping the pending connection of %s: displaced by newer connections before its hello",
                        victim.peer)
        thread = threading.Thread(target=self._serve_connection, args=(conn,), name="tmemd-conn", daemon=True)
        with self._lock:
            self._threads[conn] = thread
            thread.start()  # under the lock, so check() never sees a registered thread not yet started

    def _serve_connection(self, conn: Connection) -> None:
        guest: Guest | None = None
        try:
            deadline = time.monotonic() + self.limits.hello_timeout
            if self._tls_context is not None and not self._handshake(conn, deadline):
                return
            sock = conn.sock
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                requested = wire.recv_hello(sock, deadline - time.monotonic())
            except TimeoutError:
                LOG.warning("dropping the connection of %s: no hello within %g s", conn.peer, self.limits.hello_timeout)
                return
            guest = self._welcome(conn, requested)
            if guest is not None:
                self._answer_requests(sock, guest)
        except wire.ProtocolError as exc:
            LOG.warning("dropping the connection of %s: malformed frame: %s", conn.peer, exc)
        except OSError as exc:
            if not self._stopping.is_set():
                LOG.info("connection of %s ended: %s", conn.peer, exc)
        except Exception:  # a host bug must cost this connection, not the daemon
            LOG.exception("dropping the connection of %s: the host raised", conn.peer)
        finally:
            if guest is not None:
                self._end_guest(conn, guest)  # before leave(): the id stays held until its pools are gone
            self.admission.leave(conn)
            conn.sock.close()
            with self._lock:
                self._threads.pop(conn, None)
            if guest is not None and guest.client_id != 0 and not self.admission.guest_count():
                release_free_memory()  # the last guest left: give its pages' memory back to the system

    def _handshake(self, conn: Connection, deadline: float) -> bool:
        """TLS: the handshake (a client certificate required) within the hello's deadline; the
        certificate's subject becomes the connection's principal. False (logged) if it fails."""
        assert self._tls_context is not None and self.tls is not None
        context = self._tls_context
        if not self.admission.swap_socket(
                conn, lambda raw: context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)):
            return False  # displaced before it began
        try:
            conn.sock.settimeout(max(deadline - time.monotonic(), 0.001))
            conn.sock.do_handshake()  # type: ignore[attr-defined]
        except (ssl.SSLError, OSError) as exc:
            LOG.warning("refusing the TLS peer %s: handshake failed: %s", conn.peer, _ssl_reason(exc))
            return False
        conn.principal = self.tls.principal(conn.sock.getpeercert())  # type: ignore[attr-defined]
        conn.peer += f" ({conn.principal})"
        return True

    def _welcome(self, conn: Connection, requested: int) -> "Guest | None":
        """Answer the hello: a Guest for a welcomed connection, None (logged) for a refused one."""
        verdict = self.admission.welcome(conn, requested, self._pooled_ids)
        asked_any = requested == wire.CLIENT_ANY
        name = "any" if asked_any else str(requested)
        if verdict.status != 0:
            LOG.warning("refusing %s as client %s: %s (%s)", conn.peer, name, verdict.reason,
                        wire.refusal_text(verdict.status))
            wire.send_frame(conn.sock, wire.encode_welcome(verdict.status, 0 if asked_any else None))
            return None
        client_id = verdict.client_id
        guest = Guest(self.host, client_id, self._saves, grants=self._grants, who=f"{conn.principal}")
        wire.send_frame(conn.sock, wire.encode_welcome(0, client_id if asked_any else None))
        if conn.sock.family != socket.AF_UNIX:
            _keep_alive(conn.sock)
        LOG.info("client %d connected: %s%s", client_id, conn.peer,
                 " (control)" if client_id == 0 else " (assigned)" if asked_any else "")
        return guest

    def _pooled_ids(self) -> frozenset[int]:
        """Host clients that hold pools (a restore made them, or a live guest): never handed to a new guest."""
        clients = getattr(self.host, "clients", None)
        lock = getattr(self.host, "lock", None)
        if clients is None or lock is None:
            return frozenset()
        with lock:
            return frozenset(cid for cid, client in clients.items() if any(client.pools))

    def _end_guest(self, conn: Connection, guest: Guest) -> None:
        """The connection is gone: end the saves it left open, destroy the pools it created (a dead
        domain's pools die with it) and, if it was the last holder of its id, revoke that id's grants."""
        last = guest.client_id != 0 and self.admission.last_holder(conn)
        steps = [(logging.WARNING, "ended the unfinished save(s) of client(s)", guest.end_saves),
                 (logging.INFO, "destroyed pool(s)", guest.destroy_pools)]
        if last:
            steps.append((logging.INFO, "revoked the shared-pool grant(s)", guest.revoke_grants))
        for level, what, cleanup in steps:
            try:
                done = cleanup()
            except Exception:  # the host failing here must not take the daemon down; the log keeps the reason
                LOG.exception("client %d: cleaning up after the closed connection failed", guest.client_id)
                continue
            if done:
                LOG.log(level, "client %d: %s %s of the closed connection", guest.client_id, what, done)

    def _answer_requests(self, sock: socket.socket, guest: Guest) -> None:
        while True:
            payload = wire.recv_frame(sock, allow_eof=True)
            if payload is None:
                LOG.info("client %d disconnected", guest.client_id)
                return
            wire.send_frame(sock, guest.answer(payload))


def _libc() -> ctypes.CDLL | None:
    """glibc, for its allocator knobs; None elsewhere (musl, macOS: the knobs are then skipped)."""
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_M_ARENA_MAX = -8  # mallopt parameter (malloc.h)


def limit_malloc_arenas() -> None:
    """One malloc arena for the whole daemon. glibc gives each thread its own arena (up to 8 per core), and
    under the GIL they buy no concurrency, only memory: each arena keeps what its thread freed (measured
    with 64 guests for 5 s: RSS 26 MB before, 35 MB after they had left, for good; with one arena and
    ``release_free_memory`` when the last guest leaves, 25.3 -> 25.9 MB). Call before the threads start."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_ARENA_MAX, 1)


def release_free_memory() -> None:
    """Return the allocator's free pages to the system (malloc_trim), e.g. once the last guest has left."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def check_transport(address: wire.Address, tls: ServerTls | None, insecure_tcp: bool) -> None:
    """TCP is TLS or, on 127.0.0.1 only, explicitly insecure; a unix socket is neither (ValueError, one line)."""
    if address.family == socket.AF_UNIX:
        if tls is not None or insecure_tcp:
            raise ValueError(f"{address} authenticates peers by uid: TLS and --insecure-tcp are for tcp: addresses")
        return
    if tls is not None and insecure_tcp:
        raise ValueError("TLS and --insecure-tcp exclude each other")
    if tls is None and not insecure_tcp:
        raise ValueError(f"--listen {address} needs TLS (--tls-cert, --tls-key, --tls-ca): a TCP peer must be "
                         "authenticated (or --insecure-tcp, 127.0.0.1 only)")
    if insecure_tcp and address.sockaddr[0] != "127.0.0.1":
        raise ValueError(f"--insecure-tcp listens on 127.0.0.1 only, not {address}")


def _keep_alive(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in KEEPALIVE:
        sock.setsockopt(socket.IPPROTO_TCP, option, value)


def _ssl_reason(exc: OSError) -> str:
    return str(getattr(exc, "reason", None) or exc.strerror or exc)


class Guest:
    """One connection's client: answers its requests and remembers the pools it created."""

    def __init__(self, host: Host, client_id: int, saves: "SaveRegistry | None" = None, *,
                 grants: "GrantLedger | None" = None, who: str = "") -> None:
        self.host = host
        self.client_id = client_id
        self.who = who or f"client {client_id}"  # the principal, for logs
        self.pools: dict[int, int] = {}  # pool id -> record version (spec) it was created with
        self.saves = saves if saves is not None else SaveRegistry()
        self.grants = grants if grants is not None else GrantLedger()

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
        if cmd == abi.TMEM_NEW_POOL:
            if rc >= 0:
                self.pools[rc] = abi.version_of_record(op)
            elif rc == -errno.EPERM and len(op) in (abi.CREAT_V1.size, abi.CREAT_V0.size):
                _, _, lo, hi, flags, _ = _creat_layout(op).unpack(op)
                if flags & abi.TMEM_POOL_SHARED:  # an unauthorized join is an impersonation attempt: on record
                    LOG.warning("client %d (%s): NEW_POOL of the shared pool %s refused (-EPERM: not authorized, "
                                "or no free shared slot)", self.client_id, self.who, uuid_text((lo, hi)))
        elif cmd == abi.TMEM_DESTROY_POOL:
            self.pools.pop(pool_id, None)
        elif cmd == abi.TMEM_AUTH and rc == 1 and self.client_id == 0:
            _, _, lo, hi, flags, target = _creat_layout(op).unpack(op)
            if target != abi.CLI_ID_NULL:  # the global switch is the host's alone
                self.grants.record(target, (lo, hi), flags != 0, abi.version_of_record(op))

    def end_saves(self) -> list[int]:
        """SAVE_END every save this connection began and left open (its client thaws, stops live-migrating)."""
        return self.saves.end_all(self, lambda record: self.host.do_tmem_op(self.client_id, record))

    def revoke_grants(self) -> list[str]:
        """TMEM_AUTH off for every grant made for this client id through the server (its guest is gone:
        the next holder of the id must be authorized anew); the uuids revoked."""
        revoked = []
        for uuid, version in self.grants.take(self.client_id):
            record = abi.TmemOp(abi.TMEM_AUTH, 0, uuid=uuid, flags=0, arg1=self.client_id).encode(version)
            if self.host.do_tmem_op(0, record) >= 0:
                revoked.append(uuid_text(uuid))
        return revoked

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


class GrantLedger:
    """The shared-pool grants (TMEM_AUTH) made through this server, per client id, so they can be
    revoked when the guest holding that id goes (Xen's grants die with the domain; a client id here
    outlives its guest and may be claimed by another principal next)."""

    def __init__(self) -> None:
        self._grants: dict[int, dict[tuple[int, int], int]] = {}  # client -> {uuid: record version}
        self._lock = threading.Lock()

    def record(self, cli_id: int, uuid: tuple[int, int], on: bool, version: int) -> None:
        with self._lock:
            grants = self._grants.setdefault(cli_id, {})
            if on:
                grants[uuid] = version
            else:
                grants.pop(uuid, None)
            if not grants:
                del self._grants[cli_id]

    def take(self, cli_id: int) -> list[tuple[tuple[int, int], int]]:
        with self._lock:
            return sorted(self._grants.pop(cli_id, {}).items())

    def granted(self, cli_id: int) -> set[tuple[int, int]]:
        with self._lock:
            return set(self._grants.get(cli_id, {}))

    def check(self) -> None:
        with self._lock:
            assert all(grants and len(grants) <= abi.MAX_SHARED_AUTH for grants in self._grants.values())
            assert abi.CLI_ID_NULL not in self._grants


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


def _creat_layout(op: bytes) -> struct.Struct:
    return abi.CREAT_V1 if len(op) == abi.CREAT_V1.size else abi.CREAT_V0


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
        description="Serve a tmem host to remote guests (wire protocol: tmemcore/wire.py; who may do what: "
        "docs/trust-model.md). Unix peers are known by uid, TCP peers by TLS client certificate. A guest's "
        "pools are destroyed when its connection closes.",
    )
    parser.add_argument("--listen", required=True,
                        help="unix:PATH, or tcp:HOST:PORT with TLS (or --insecure-tcp); port 0 picks a free one "
                        "(required, no default)")
    parser.add_argument("--socket-mode", type=octal_mode, metavar="MODE",
                        help="unix socket file mode, octal (default: 0660: the daemon's user and group)")
    parser.add_argument("--group", type=group_id, metavar="GROUP",
                        help="unix socket file group, a name or gid (default: the daemon's group)")
    parser.add_argument("--tls-cert", metavar="FILE", help="TCP: this daemon's certificate, PEM (default: none)")
    parser.add_argument("--tls-key", metavar="FILE", help="TCP: its private key, PEM (default: none)")
    parser.add_argument("--tls-ca", metavar="FILE",
                        help="TCP: the CA that client certificates must chain to, PEM (default: none)")
    parser.add_argument("--tls-control-subject", action="append", default=[], metavar="SUBJECT",
                        help="a client certificate subject with control rights (client 0), e.g. CN=tmemctl or "
                        "O=tmem,CN=ops; repeatable (default: none: TLS peers are guests only)")
    parser.add_argument("--insecure-tcp", action="store_true",
                        help="plain TCP on 127.0.0.1 only, no authentication: every local process may act as "
                        "dom0 and any guest (default: off)")
    parser.add_argument("--shared-auth", action="store_true",
                        help="a guest joins or creates a shared pool only after TMEM_AUTH (tmemctl auth) for its "
                        "client id and the pool's uuid; unauthorized: -EPERM (default: off, any guest may share)")
    parser.add_argument("--max-connections", type=positive_int, default=Limits.guests, metavar="N",
                        help="guest connections in all (control connections have their own slots) "
                        "(default: %(default)s)")
    parser.add_argument("--max-per-principal", type=positive_int, default=Limits.per_principal, metavar="N",
                        help="guest connections per uid or certificate subject (default: %(default)s)")
    parser.add_argument("--max-control", type=positive_int, default=Limits.control, metavar="N",
                        help="control connections (client 0), kept apart from the guests' (default: %(default)s)")
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


def octal_mode(text: str) -> int:
    """A file mode in octal, 0..0777 (argparse type)."""
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"expected an octal mode 0..0777 (e.g. 0660), got {text!r}")
    return mode


def group_id(text: str) -> int:
    """A group name or number (argparse type)."""
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no group {text!r}") from None


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def check_flags(args: argparse.Namespace) -> None:
    """Refuse combinations the host would silently ignore (UsageError, one line)."""
    if args.tze and not args.dedup:
        raise UsageError("--tze needs --dedup (trailing-zero elimination works on deduplicated pages)")
    if args.dedup and args.compress_default:
        raise UsageError("--compress-default and --dedup exclude each other (a dedup host refuses compression)")
    if args.accept_v0 and args.spec == "v0":
        raise UsageError("--accept-v0 is for a v1 host; a --spec v0 host accepts only v0")
    check_transport_flags(args)


def check_transport_flags(args: argparse.Namespace) -> None:
    address = wire.parse_address(args.listen)  # ValueError: a usage error too
    tls_files = {"--tls-cert": args.tls_cert, "--tls-key": args.tls_key, "--tls-ca": args.tls_ca}
    given = [name for name, value in tls_files.items() if value]
    if address.family == socket.AF_UNIX:
        wrong = given + (["--tls-control-subject"] if args.tls_control_subject else []) \
            + (["--insecure-tcp"] if args.insecure_tcp else [])
        if wrong:
            raise UsageError(f"{' and '.join(wrong)}: for tcp: addresses; a unix socket knows its peers by uid")
        return
    if args.socket_mode is not None or args.group is not None:
        raise UsageError("--socket-mode and --group are for unix: sockets")
    if given and len(given) < 3:
        missing = [name for name in tls_files if name not in given]
        raise UsageError(f"TLS needs {', '.join(tls_files)}: {' and '.join(missing)} missing")
    if args.tls_control_subject and not given:
        raise UsageError("--tls-control-subject needs TLS (--tls-cert, --tls-key, --tls-ca)")


def build_tls(args: argparse.Namespace) -> ServerTls | None:
    if not args.tls_cert:
        return None
    subjects = frozenset(normalize_subject(text) for text in args.tls_control_subject)
    return ServerTls(args.tls_cert, args.tls_key, args.tls_ca, subjects)


def build_server(args: argparse.Namespace, host: Host) -> TmemServer:
    """The TmemServer the options describe (ValueError, one line, for a bad TLS file or transport)."""
    limits = Limits(guests=args.max_connections, per_principal=args.max_per_principal, control=args.max_control,
                    hello_timeout=HELLO_TIMEOUT)
    return TmemServer(host, args.listen, limits=limits, tls=build_tls(args), insecure_tcp=args.insecure_tcp,
                      socket_mode=DEFAULT_SOCKET_MODE if args.socket_mode is None else args.socket_mode,
                      socket_group=args.group)


def build_host(args: argparse.Namespace) -> Any:
    from .tmem import Tmem

    pages = size_to_pages(parse_size(args.memory))  # rounded up, as guestfs mount --tmem does
    if pages < 1:
        raise UsageError(f"--memory must be at least 1 byte (rounded up to whole {abi.PAGE_SIZE}-byte pages), "
                         f"got {args.memory!r}")
    return Tmem(memory_pages=pages, accept_v0=args.accept_v0,
                spec_version=abi.SPEC_V0 if args.spec == "v0" else abi.SPEC_V1,
                dedup=args.dedup, tze=args.tze, compress=args.compress_default,
                store=args.store, shared_auth=args.shared_auth, shared_auth_strict=args.shared_auth)


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


def self_check(host: Any, server: TmemServer) -> bool:
    """SIGUSR1: assert the host's and the server's invariants and log the outcome (one line)."""
    try:
        host.check()
        server.check()
    except AssertionError as exc:
        LOG.error("self-check FAILED: %s", exc)
        return False
    LOG.info("self-check: invariants hold (%d connections, %d pages)", server.connection_count(),
             getattr(host, "npages", 0))
    return True


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        check_flags(args)
        if args.ready_file:
            check_ready_file(args.ready_file)
        host = build_host(args)
        server = build_server(args, host)
    except (ValueError, TmemError) as exc:  # bad usage, --listen, --memory or a TLS file
        print(f"tmemd: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(stream=sys.stderr, level=args.log_level, format="tmemd: %(levelname)s %(message)s")
    limit_malloc_arenas()  # before server.start() makes the first thread
    try:
        address = server.start()
    except OSError as exc:  # the directory is missing, the address is taken, ...
        print(f"tmemd: cannot listen on {server.listen_address}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    stop, check_now, wake = threading.Event(), threading.Event(), threading.Event()
    for signum, flag in ((signal.SIGTERM, stop), (signal.SIGINT, stop), (signal.SIGUSR1, check_now)):
        signal.signal(signum, lambda *_, flag=flag: (flag.set(), wake.set()))
    print(f"tmemd listening on {address}", flush=True)
    try:
        if args.ready_file:
            try:
                write_ready_file(args.ready_file, address)
            except OSError as exc:  # checked before listening; the directory changed since
                print(f"tmemd: cannot write --ready-file {args.ready_file}: {exc.strerror or exc}", file=sys.stderr)
                return 1
        while not stop.is_set():
            wake.wait(1.0)  # the timeout only keeps the main thread responsive to signals
            wake.clear()
            if check_now.is_set():
                check_now.clear()
                self_check(host, server)
        LOG.info("shutting down")
        return 0
    finally:
        server.stop()
        if args.ready_file:  # a stale address file would send the next caller to a dead server
            args.ready_file.unlink(missing_ok=True)


if __name__ == "__main__":
    raise SystemExit(main())
