"""Who a tmemd peer is, and what it may do (docs/trust-model.md).

Identity comes from the transport, never from what a peer says:

* a unix-socket peer is the uid the kernel reports for it (``SO_PEERCRED``, fixed at connect time);
  root and the daemon's own uid are control principals (they could read the daemon's memory anyway);
* a TLS peer is its client certificate's subject (the certificate must chain to ``--tls-ca``);
  the subjects named by ``--tls-control-subject`` are control principals;
* with ``--insecure-tcp`` (127.0.0.1 only) every peer is one control principal, as tmemd was before
  it had a trust model.

``Admission`` is the server's table of connections: the pending ones (accepted, hello not yet
answered) and the welcomed ones, which client id each welcomed connection holds and for which
principal. It decides every hello (``welcome``) and every connection limit; it does no I/O, so the
rules are tested directly as well as through real sockets.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from . import wire

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class Principal:
    """An authenticated peer: ``kind`` "uid", "tls" or "insecure-tcp", and its name in that kind."""

    kind: str
    name: str
    control: bool = False

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"


INSECURE_TCP = Principal("insecure-tcp", "127.0.0.1", control=True)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of a unix-socket peer, as the kernel recorded them when it connected."""
    return _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))


def default_control_uids() -> frozenset[int]:
    """Root and the daemon's own uid: both can read the daemon's memory, so denying them control buys nothing."""
    return frozenset({0, os.geteuid()})


def unix_principal(uid: int, control_uids: frozenset[int]) -> Principal:
    return Principal("uid", str(uid), control=uid in control_uids)


def shutdown(sock: socket.socket) -> None:
    """Shut a socket down for both directions (its reader wakes up); quiet if it is gone already."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the fd itself, also under a TLS socket
    except OSError:
        pass  # closed, or never connected: nothing to wake


# ===================================================================== certificate subjects

_SHORT_NAMES = {
    "commonname": "CN", "organizationname": "O", "organizationalunitname": "OU", "countryname": "C",
    "stateorprovincename": "ST", "localityname": "L", "domaincomponent": "DC", "userid": "UID",
    "emailaddress": "emailAddress", "serialnumber": "serialNumber",
}  # fmt: skip
_SHORT_NAMES.update({short.lower(): short for short in list(_SHORT_NAMES.values())})


def _short(key: str) -> str:
    """The usual short name of a subject attribute (``commonName``, ``cn`` -> ``CN``); others as given."""
    key = key.strip()
    return _SHORT_NAMES.get(key.lower(), key)


def subject_text(subject: Iterable[Iterable[tuple[str, str]]]) -> str:
    """A certificate subject as ``ssl.getpeercert()`` gives it, as text: ``O=tmem,CN=guest-a`` (the
    certificate's order, short attribute names)."""
    return ",".join(f"{_short(key)}={value}" for rdn in subject for key, value in rdn)


def normalize_subject(text: str) -> str:
    """A subject as an operator writes it (``CN = guest-a, O=tmem``) in ``subject_text``'s form;
    ValueError if it is not KEY=VALUE parts separated by commas."""
    parts = []
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"bad certificate subject {text!r}: expected KEY=VALUE[,KEY=VALUE...], e.g. CN=tmemctl")
        parts.append(f"{_short(key)}={value.strip()}")
    return ",".join(parts)


@dataclass(frozen=True)
class ServerTls:
    """The daemon's TLS: its certificate and key, the CA client certificates must chain to, and the
    client subjects that have control rights (normalized with ``normalize_subject``)."""

    cert: str
    key: str
    ca: str
    control_subjects: frozenset[str] = frozenset()

    def server_context(self) -> ssl.SSLContext:
        """TLS 1.2+, a client certificate required; ValueError (one line) if a file is unusable."""
        try:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_cert_chain(self.cert, self.key)
            context.load_verify_locations(cafile=self.ca)
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "reason", None) or exc.strerror or exc
            raise ValueError(f"cannot use TLS files (cert {self.cert}, key {self.key}, ca {self.ca}): {reason}") from exc
        return context

    def principal(self, peer_cert: dict[str, object] | None) -> Principal:
        """The principal of a verified peer certificate (ssl.SSLSocket.getpeercert())."""
        subject = subject_text(peer_cert.get("subject", ()) if peer_cert else ())  # type: ignore[arg-type]
        return Principal("tls", subject, control=subject in self.control_subjects)


# ===================================================================== limits and admission


@dataclass(frozen=True)
class Limits:
    """Connection limits (docs/trust-model.md). Guests and control connections have separate slots, so
    no number of guests can keep tmemctl out; no principal may hold more than ``per_principal`` guest
    connections, so no one user can take every guest slot; pending connections (accepted, no hello
    answered yet) are capped separately and a new one displaces the oldest (of its own peer first), so
    silent sockets cannot keep anyone out even for the ``hello_timeout`` they may last."""

    guests: int = 256
    control: int = 16
    per_principal: int = 64
    pending: int = 128
    pending_per_peer: int = 32
    hello_timeout: float = 5.0

    def __post_init__(self) -> None:
        for name in ("guests", "control", "per_principal", "pending", "pending_per_peer"):
            if getattr(self, name) < 1:
                raise ValueError(f"connection limit {name} must be at least 1, got {getattr(self, name)}")
        if not self.hello_timeout > 0:
            raise ValueError(f"the hello timeout must be positive, got {self.hello_timeout}")


@dataclass(eq=False)
class Connection:
    """One accepted connection. ``sock`` is the socket its thread uses (the TLS one after the handshake)."""

    sock: socket.socket
    peer: str  # for logs: "uid 1000 pid 42", "tcp 127.0.0.1:4711"
    peer_key: str  # whose pending slots it counts against: the principal, or a TCP peer's address
    principal: Principal | None = None  # None until authenticated (TLS: after the handshake)
    client_id: int | None = None  # None until welcomed

    @property
    def control(self) -> bool:
        return self.client_id == 0


@dataclass
class Holder:
    principal: Principal
    connections: int = 0


@dataclass(frozen=True)
class Verdict:
    """A hello's outcome: status 0 and the client id, or a -errno and the reason (logged)."""

    status: int
    client_id: int = 0
    reason: str = ""


@dataclass
class Admission:
    limits: Limits = field(default_factory=Limits)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Lock order: Admission.lock, then the host's lock (pooled_ids is called under ours); never the other way.

    def __post_init__(self) -> None:
        self.pending: dict[Connection, None] = {}  # insertion order = age
        self.welcomed: set[Connection] = set()
        self.holders: dict[int, Holder] = {}  # guest client id -> the principal holding it

    # --- pending connections ----------------------------------------------------------------------

    def admit(self, conn: Connection, exempt: bool = False) -> list[Connection]:
        """Register an accepted connection; the pending ones it displaces (their sockets are for the
        caller to shut down). ``exempt``: a control principal's burst does not count per peer."""
        with self.lock:
            victims = []
            mine = [other for other in self.pending if other.peer_key == conn.peer_key]
            if not exempt and len(mine) >= self.limits.pending_per_peer:
                victims.append(mine[0])
            elif len(self.pending) >= self.limits.pending:
                victims.append(next(iter(self.pending)))
            for victim in victims:
                del self.pending[victim]
                shutdown(victim.sock)  # under the lock: its thread cannot swap in a TLS socket meanwhile
            self.pending[conn] = None
            return victims

    def swap_socket(self, conn: Connection, wrap: Callable[[socket.socket], socket.socket]) -> bool:
        """Replace a pending connection's socket by ``wrap(sock)`` (TLS), unless it was displaced."""
        with self.lock:
            if conn not in self.pending:
                return False
            conn.sock = wrap(conn.sock)
            return True

    def is_pending(self, conn: Connection) -> bool:
        with self.lock:
            return conn in self.pending

    # --- the hello ----------------------------------------------------------------------------

    def welcome(self, conn: Connection, requested: int, pooled_ids: Callable[[], frozenset[int]]) -> Verdict:
        """Decide a hello for ``requested`` from the authenticated ``conn``; on success ``conn`` is
        welcomed and holds its id. ``pooled_ids()`` are the host clients that hold pools."""
        principal = conn.principal
        assert principal is not None, "a hello is decided only for an authenticated connection"
        with self.lock:
            if conn not in self.pending:
                return Verdict(-errno.ECONNABORTED, reason="displaced by newer connections before its hello")
            verdict = self._decide(principal, requested, pooled_ids)
            if verdict.status == 0:
                del self.pending[conn]
                conn.client_id = verdict.client_id
                self.welcomed.add(conn)
                if verdict.client_id != 0:
                    holder = self.holders.setdefault(verdict.client_id, Holder(principal))
                    holder.connections += 1
            return verdict

    def _decide(self, principal: Principal, requested: int, pooled_ids: Callable[[], frozenset[int]]) -> Verdict:
        if requested == 0:
            if not principal.control:
                return Verdict(-errno.EPERM, reason=f"client 0 (control) needs control rights, {principal} has none")
            if sum(c.control for c in self.welcomed) >= self.limits.control:
                return Verdict(-errno.EBUSY, reason=f"all {self.limits.control} control slots are taken")
            return Verdict(0, 0)
        guests = [c for c in self.welcomed if not c.control]
        if len(guests) >= self.limits.guests:
            return Verdict(-errno.EBUSY, reason=f"all {self.limits.guests} guest slots are taken")
        if sum(c.principal == principal for c in guests) >= self.limits.per_principal:
            return Verdict(-errno.EBUSY, reason=f"{principal} holds its limit of {self.limits.per_principal} "
                                                "guest connections")
        if requested == wire.CLIENT_ANY:
            taken = set(self.holders) | pooled_ids()
            free = next((cid for cid in range(1, wire.MAX_CLIENT_ID + 1) if cid not in taken), None)
            if free is None:
                return Verdict(-errno.ENOSPC, reason="no free client id")
            return Verdict(0, free)
        holder = self.holders.get(requested)
        if holder is not None and holder.principal != principal:
            return Verdict(-errno.EPERM, reason=f"client {requested} is held by another principal")
        if holder is None and not principal.control and requested in pooled_ids():
            return Verdict(-errno.EPERM, reason=f"client {requested} has pools no connection holds (a restore "
                                                "made them): only a control principal may claim it")
        return Verdict(0, requested)

    # --- the end ------------------------------------------------------------------------------

    def last_holder(self, conn: Connection) -> bool:
        """Whether ``conn`` is the only connection holding its guest client id."""
        with self.lock:
            holder = self.holders.get(conn.client_id) if conn.client_id and conn in self.welcomed else None
            return holder is not None and holder.connections == 1

    def leave(self, conn: Connection) -> bool:
        """Forget ``conn``; True if it was the last connection holding its guest client id."""
        with self.lock:
            self.pending.pop(conn, None)
            if conn not in self.welcomed:
                return False
            self.welcomed.discard(conn)
            holder = self.holders.get(conn.client_id) if conn.client_id else None
            if holder is None:
                return False
            holder.connections -= 1
            if holder.connections:
                return False
            del self.holders[conn.client_id]  # type: ignore[arg-type]
            return True

    # --- views --------------------------------------------------------------------------------

    def guest_count(self) -> int:
        """Welcomed guest (not control) connections."""
        with self.lock:
            return sum(not conn.control for conn in self.welcomed)

    def connections(self) -> list[Connection]:
        with self.lock:
            return [*self.pending, *self.welcomed]

    def client_ids(self) -> dict[int, int]:
        """How many welcomed connections speak for each client id (0: control connections)."""
        with self.lock:
            counts: dict[int, int] = {}
            for conn in self.welcomed:
                assert conn.client_id is not None
                counts[conn.client_id] = counts.get(conn.client_id, 0) + 1
            return counts

    def check(self) -> None:
        with self.lock:
            assert not set(self.pending) & self.welcomed, "a connection both pending and welcomed"
            assert len(self.pending) <= self.limits.pending
            guests = [c for c in self.welcomed if not c.control]
            assert len(guests) <= self.limits.guests
            assert sum(c.control for c in self.welcomed) <= self.limits.control
            counts: dict[int, int] = {}
            for conn in guests:
                assert conn.client_id is not None and 1 <= conn.client_id <= wire.MAX_CLIENT_ID
                holder = self.holders[conn.client_id]
                assert holder.principal == conn.principal, f"client {conn.client_id} held by two principals"
                counts[conn.client_id] = counts.get(conn.client_id, 0) + 1
            assert counts == {cid: h.connections for cid, h in self.holders.items()}, (counts, self.holders)
            assert all(c.principal is not None and c.principal.control for c in self.welcomed if c.control)
