"""The tmemd wire protocol: raw tmem_op records plus the guest buffer over a byte stream.

A remote guest sends the SAME 56-byte (v1) or 40-byte (v0) ``struct tmem_op`` records an
in-process guest hands to ``Tmem.do_tmem_op``; the wire only adds framing and carries the
page/buffer that stands for the guest frame (``cmfn``) or the control ``buf``.

Addresses: ``"unix:/path/to/socket"`` or ``"tcp:HOST:PORT"`` (``tcp:127.0.0.1:7077``,
``tcp:[::1]:7077``; port 0 lets the server pick one when listening).

Every message is a frame: ``u32 length`` (little-endian, of what follows) + payload; a
payload is at most ``MAX_PAYLOAD`` bytes, anything larger is a protocol error and the
receiver closes the connection.

    hello     client -> server   b"TMEMWIRE" | u16 protocol (1) | u16 client id
    welcome   server -> client   b"TMEMWIRE" | u16 protocol (1) | s32 status (0 = ok)
                                 [| u16 assigned client id  -- only after a hello for CLIENT_ANY]
    request   client -> server   u8 buffer mode | u8 record length | u32 buffer length
                                 | record | buffer bytes (mode SEND only)
    response  server -> client   s32 rc | u8 has buffer | u32 buffer length | buffer bytes

Buffer modes: NONE (no buffer: flushes, NEW_POOL, ...), SEND (the buffer's bytes follow: PUT,
WRITE, READ, CONTROL RESTORE_PUT_PAGE, ...), SIZE (a zero-filled buffer of that length,
nothing sent: GET_PAGE, which overwrites the whole page on a hit, and the control sub-ops
that only write their buffer: LIST, SAVE_GET_POOL_UUID, SAVE_GET_NEXT_PAGE, SAVE_GET_NEXT_INV). The response carries the buffer back only when
the host wrote to it: for CONTROL always, for GET_PAGE/READ only on a hit (rc == 1).
One connection speaks for one client id, named once in the hello; requests on a connection
are answered in order.

Who may speak for which id is decided by the transport, never by the hello (docs/trust-model.md):
a unix peer by its uid (SO_PEERCRED), a TCP peer by its TLS client certificate's subject. Only a
control principal (root or the daemon's uid; a configured certificate subject) may name client 0
(dom0: control ops); an id one principal's connection holds is refused to any other principal.
A refused hello gets a welcome with a nonzero status and the connection is closed: ``-EPERM``
(client 0 without control rights, an id held by another principal or by the host), ``-EBUSY``
(a connection limit), ``-ENOSPC`` (no free client id). These statuses came with the trust model;
the frames did not change, so the protocol is still 1 (a protocol-1 client already treats any
nonzero status as a refusal). Over TCP the frames run inside TLS (``TlsConfig``); only a daemon
started with ``--insecure-tcp`` (127.0.0.1 only) speaks them in the clear.

Client id assignment (a compatible extension of protocol 1): a hello naming ``CLIENT_ANY``
(0xFFFF, Xen's CLI_ID_NULL, never a real domain id) asks the server to pick one; the server
answers with a 16-byte welcome whose extra u16 is the id it assigned -- the lowest id >= 1 that
no open connection holds and the host has no pools for. A hello naming a real id gets the
classic 14-byte welcome, so old clients and old servers keep working with explicit ids (an old
server cannot assign ids: a client asking for one gets a 14-byte welcome and reports the server
as too old).

Connection lifetime = guest lifetime: when a connection closes (cleanly, by a crash or
``kill -9`` of the guest), the server destroys every pool that connection created with
NEW_POOL (DESTROY_POOL as that client), as Xen destroys a domain's pools when the domain
dies. Connections of one principal may share an explicit id; each destroys only the pools it
created.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass

from . import abi

MAGIC = b"TMEMWIRE"
PROTOCOL = 1
CLIENT_ANY = abi.CLI_ID_NULL  # hello: "assign me a free client id" (0xFFFF is no domain id)
MAX_CLIENT_ID = CLIENT_ANY - 1
MAX_RECORD = 64
MAX_BUFFER = 1 << 20  # big enough for a LIST of many clients; a page is 4 KiB
MAX_PAYLOAD = 16 + MAX_RECORD + MAX_BUFFER

BUF_NONE = 0
BUF_SEND = 1
BUF_SIZE = 2
BUFFER_MODES = (BUF_NONE, BUF_SEND, BUF_SIZE)

_LENGTH = struct.Struct("<I")
_HELLO = struct.Struct("<8sHH")
_WELCOME = struct.Struct("<8sHi")
_ASSIGNED = struct.Struct("<H")  # the extension of a welcome that answers a CLIENT_ANY hello
_REQUEST = struct.Struct("<BBI")
_RESPONSE = struct.Struct("<iBI")
_CMD = struct.Struct("<I")
_CMD_SUBOP = struct.Struct("<IiI")  # cmd, pool_id, ctrl.subop (same offset in v0 and v1)

BUFFER_WRITERS = frozenset({abi.TMEM_GET_PAGE, abi.TMEM_READ})  # + CONTROL, always
WRITE_ONLY_SUBOPS = frozenset(
    {abi.TMEMC_LIST, abi.TMEMC_SAVE_GET_POOL_UUID, abi.TMEMC_SAVE_GET_NEXT_PAGE, abi.TMEMC_SAVE_GET_NEXT_INV}
)


class ProtocolError(ConnectionError):
    """The peer sent something that is not this protocol; the connection is dropped."""


# ===================================================================== addresses


@dataclass(frozen=True)
class Address:
    family: socket.AddressFamily
    sockaddr: str | tuple[str, int]

    def __str__(self) -> str:
        if self.family == socket.AF_UNIX:
            return f"unix:{self.sockaddr}"
        host, port = self.sockaddr[0], self.sockaddr[1]
        return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"


def parse_address(text: str) -> Address:
    """``unix:/path`` or ``tcp:HOST:PORT``; ValueError with a one-line message otherwise."""
    scheme, _, rest = text.partition(":")
    if scheme == "unix" and rest:
        return Address(socket.AF_UNIX, rest)
    if scheme == "tcp":
        host, _, port_text = rest.rpartition(":")
        host = host.strip("[]")
        if host and port_text.isdigit() and int(port_text) <= 65535:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            return Address(family, (host, int(port_text)))
    raise ValueError(f"bad address {text!r}: expected unix:/path or tcp:HOST:PORT")


def address_of(sock: socket.socket) -> str:
    """The address text a listening socket is bound to (with the real port for port 0)."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return str(Address(socket.AF_UNIX, name))
    return str(Address(sock.family, (name[0], name[1])))


def refusal_text(status: int) -> str:
    """A welcome's nonzero status in words: ``Operation not permitted (-EPERM)``."""
    name = errno.errorcode.get(-status)
    return f"{os.strerror(-status)} (-{name})" if name else f"status {status}"


# ===================================================================== TLS (client side)


class TlsConfigError(ValueError):
    """A TLS certificate, key or CA file that cannot be used; the message is one line naming them."""


@dataclass(frozen=True)
class TlsConfig:
    """What a client needs to reach a TLS tmemd: its own certificate and key (the server requires one:
    the certificate's subject is the client's identity) and the CA that signed the server's certificate.

    ``server_name`` is the name the server's certificate must carry; None: the address's host (an IP
    address is matched against the certificate's IP subjectAltName)."""

    cert: str
    key: str
    ca: str
    server_name: str | None = None

    def client_context(self) -> ssl.SSLContext:
        """A verifying client context (TLS 1.2+, hostname checked); TlsConfigError if a file is unusable."""
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:  # ssl.SSLError is an OSError; both name the reason
            raise TlsConfigError(f"cannot use TLS files (cert {self.cert}, key {self.key}, ca {self.ca}): "
                                 f"{_reason(exc)}") from exc
        return context


def _reason(exc: OSError) -> str:
    return str(getattr(exc, "reason", None) or exc.strerror or exc)


def unreachable(address: str, exc: OSError) -> str:
    """The one-line reason a tmemd could not be reached, naming its address."""
    return f"cannot reach tmemd at {address}: {exc.strerror or exc}"


# ===================================================================== framing


def send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_LENGTH.pack(len(payload)) + payload)


def recv_exact(sock: socket.socket, size: int) -> bytes:
    """Exactly ``size`` bytes; ConnectionError if the peer closes first."""
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(min(size - len(chunks), 1 << 16))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(chunks)} of {size} bytes")
        chunks += chunk
    return bytes(chunks)


def recv_frame(sock: socket.socket, *, allow_eof: bool = False) -> bytes | None:
    """One frame's payload. None on a clean close before a frame when ``allow_eof``."""
    first = sock.recv(_LENGTH.size)
    if not first:
        if allow_eof:
            return None
        raise ConnectionError("connection closed")
    header = first + (recv_exact(sock, _LENGTH.size - len(first)) if len(first) < _LENGTH.size else b"")
    (length,) = _LENGTH.unpack(header)
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"frame of {length} bytes exceeds the {MAX_PAYLOAD}-byte limit")
    return recv_exact(sock, length)


# ===================================================================== messages


def encode_hello(client_id: int) -> bytes:
    if not 0 <= client_id <= 0xFFFF:
        raise ValueError(f"client id {client_id} is not a 16-bit domain id")
    return _HELLO.pack(MAGIC, PROTOCOL, client_id)


def recv_hello(sock: socket.socket, timeout: float) -> int:
    """The client id of the hello a new connection must send first, read within ``timeout`` seconds
    in all (a peer trickling bytes cannot keep its slot) and no further than the hello's own frame.
    TimeoutError, ConnectionError, or ProtocolError if the first frame is not a hello."""
    deadline = time.monotonic() + timeout
    data = b""
    want = _LENGTH.size + _HELLO.size
    while len(data) < want:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no hello within {timeout:g} s")
        sock.settimeout(remaining)
        chunk = sock.recv(want - len(data))
        if not chunk:
            raise ConnectionError("connection closed before its hello")
        data += chunk
        if len(data) >= _LENGTH.size and _LENGTH.unpack_from(data)[0] != _HELLO.size:
            raise ProtocolError(f"a hello is {_HELLO.size} bytes, the first frame declares {_LENGTH.unpack_from(data)[0]}")
    sock.settimeout(None)  # a connected guest may stay idle as long as it likes
    return decode_hello(data[_LENGTH.size :])


def decode_hello(payload: bytes) -> int:
    """The client id a hello names; ProtocolError if it is not a hello."""
    if len(payload) != _HELLO.size:
        raise ProtocolError(f"hello is {len(payload)} bytes, expected {_HELLO.size}")
    magic, protocol, client_id = _HELLO.unpack(payload)
    if magic != MAGIC or protocol != PROTOCOL:
        raise ProtocolError(f"not a tmem wire hello (magic {magic!r}, protocol {protocol})")
    return client_id


def encode_welcome(status: int = 0, assigned: int | None = None) -> bytes:
    """A welcome; ``assigned`` (the id picked for a CLIENT_ANY hello) makes it 16 bytes."""
    tail = b"" if assigned is None else _ASSIGNED.pack(assigned)
    return _WELCOME.pack(MAGIC, PROTOCOL, status) + tail


def decode_welcome(payload: bytes) -> tuple[int, int | None]:
    """(status, assigned client id or None for a classic 14-byte welcome)."""
    if len(payload) not in (_WELCOME.size, _WELCOME.size + _ASSIGNED.size):
        raise ProtocolError(f"welcome is {len(payload)} bytes, expected {_WELCOME.size} or {_WELCOME.size + 2}")
    magic, protocol, status = _WELCOME.unpack_from(payload)
    if magic != MAGIC or protocol != PROTOCOL:
        raise ProtocolError(f"not a tmemd welcome (magic {magic!r}, protocol {protocol})")
    assigned = _ASSIGNED.unpack_from(payload, _WELCOME.size)[0] if len(payload) > _WELCOME.size else None
    return status, assigned


def buffer_mode_for(op: bytes, page: bytearray | memoryview | None) -> int:
    """SIZE for ops that only write the buffer (no point sending its old bytes), else SEND."""
    if page is None:
        return BUF_NONE
    if len(op) < 12:
        return BUF_SEND
    cmd, _, subop = _CMD_SUBOP.unpack_from(op)
    if cmd == abi.TMEM_GET_PAGE or (cmd == abi.TMEM_CONTROL and subop in WRITE_ONLY_SUBOPS):
        return BUF_SIZE
    return BUF_SEND


def encode_request(op: bytes, page: bytearray | memoryview | bytes | None, mode: int | None = None) -> bytes:
    if len(op) > MAX_RECORD:
        raise ValueError(f"record of {len(op)} bytes exceeds {MAX_RECORD}")
    if page is not None and len(page) > MAX_BUFFER:
        raise ValueError(f"buffer of {len(page)} bytes exceeds {MAX_BUFFER}")
    mode = buffer_mode_for(op, page) if mode is None else mode
    size = 0 if page is None else len(page)
    body = bytes(page) if mode == BUF_SEND and page is not None else b""
    return _REQUEST.pack(mode, len(op), size) + bytes(op) + body


@dataclass
class Request:
    op: bytes
    mode: int
    buffer: bytearray | None


def decode_request(payload: bytes) -> Request:
    """Parse a request; ProtocolError when the framing is inconsistent."""
    if len(payload) < _REQUEST.size:
        raise ProtocolError(f"request of {len(payload)} bytes is shorter than its {_REQUEST.size}-byte header")
    mode, record_len, buf_len = _REQUEST.unpack_from(payload)
    if mode not in BUFFER_MODES:
        raise ProtocolError(f"unknown buffer mode {mode}")
    if record_len > MAX_RECORD or buf_len > MAX_BUFFER:
        raise ProtocolError(f"record {record_len} / buffer {buf_len} bytes exceed the limits")
    sent = buf_len if mode == BUF_SEND else 0
    expected = _REQUEST.size + record_len + sent
    if len(payload) != expected or (mode == BUF_NONE and buf_len):
        raise ProtocolError(f"request is {len(payload)} bytes, its header implies {expected}")
    op = payload[_REQUEST.size : _REQUEST.size + record_len]
    if mode == BUF_NONE:
        buffer = None
    elif mode == BUF_SEND:
        buffer = bytearray(payload[_REQUEST.size + record_len :])
    else:
        buffer = bytearray(buf_len)
    return Request(op, mode, buffer)


def host_wrote_buffer(op: bytes, rc: int) -> bool:
    """Whether a response must carry the buffer back (see the module docstring)."""
    if len(op) < _CMD.size:
        return False
    (cmd,) = _CMD.unpack_from(op)
    return cmd == abi.TMEM_CONTROL or (cmd in BUFFER_WRITERS and rc == abi.RC_HIT)


def encode_response(rc: int, buffer: bytearray | None) -> bytes:
    if buffer is None:
        return _RESPONSE.pack(rc, 0, 0)
    return _RESPONSE.pack(rc, 1, len(buffer)) + bytes(buffer)


def decode_response(payload: bytes) -> tuple[int, bytes | None]:
    if len(payload) < _RESPONSE.size:
        raise ProtocolError(f"response of {len(payload)} bytes is shorter than its header")
    rc, has_buffer, buf_len = _RESPONSE.unpack_from(payload)
    body = payload[_RESPONSE.size :]
    if len(body) != (buf_len if has_buffer else 0):
        raise ProtocolError(f"response carries {len(body)} buffer bytes, its header says {buf_len}")
    return rc, (body if has_buffer else None)


# ===================================================================== the client


class RemoteTmem:
    """A tmem host reached over the wire, speaking for one client id.

    ``do_tmem_op(op, page)`` behaves like ``Tmem.do_tmem_op(client_id, op, page)``: same
    records, same return codes, ``page`` filled in place on GET/READ hits and CONTROL ops.
    Transport failures raise ``ConnectionError`` / ``TimeoutError`` / ``OSError`` (a guest
    turns those into misses); the broken connection is dropped and the next call connects
    again. Thread-safe: calls are serialized on one connection.

    ``client_id`` may be ``CLIENT_ANY``: the server then assigns one per connection, and
    ``client_id`` holds the assigned id while connected (CLIENT_ANY before the first connect).
    ``connect()`` connects now (a probe that keeps the connection); otherwise the first
    ``do_tmem_op`` connects.
    """

    def __init__(self, address: str, client_id: int, timeout: float = 2.0, tls: TlsConfig | None = None) -> None:
        self.address = parse_address(address)
        self.requested_id = client_id
        self.client_id = client_id
        self.timeout = timeout
        encode_hello(client_id)  # validates the id now rather than on first use
        if tls is not None and self.address.family == socket.AF_UNIX:
            raise ValueError(f"TLS is for tcp: addresses; {address} is authenticated by its peer credentials")
        self.tls = tls
        # built once, so unusable certificate files fail here (TlsConfigError), not at each connect
        self._tls_context = None if tls is None else tls.client_context()
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def connect(self) -> int:
        """Connect (if not connected) and return the client id this connection speaks for.

        Raises OSError (ConnectionRefusedError, FileNotFoundError, TimeoutError, ProtocolError ...)."""
        with self._lock:
            if self._sock is None:
                self._connect()
            return self.client_id

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def do_tmem_op(self, op: bytes, page: bytearray | memoryview | None = None) -> int:
        request = encode_request(op, page)
        with self._lock:
            sock = self._sock or self._connect()
            try:
                send_frame(sock, request)
                rc, buffer = decode_response(recv_frame(sock) or b"")
            except BaseException:  # an OSError (ConnectionError, TimeoutError, ProtocolError), or Ctrl-C:
                self._drop()  # either way a reply may be left unread on this socket, so never reuse it
                raise
        if buffer is not None and page is not None:
            if len(buffer) != len(page):
                self.close()
                raise ProtocolError(f"response buffer of {len(buffer)} bytes for a {len(page)}-byte page")
            page[:] = buffer
        return rc

    def close(self) -> None:
        with self._lock:
            self._drop()

    def check(self) -> None:
        assert self._sock is None or self._sock.gettimeout() == self.timeout
        assert self.requested_id == CLIENT_ANY or self.client_id == self.requested_id

    def _connect(self) -> socket.socket:
        sock = socket.socket(self.address.family, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.address.sockaddr)
            if self.address.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls_context is not None:
                assert self.tls is not None
                server_name = self.tls.server_name or str(self.address.sockaddr[0])
                sock = self._tls_context.wrap_socket(sock, server_hostname=server_name)  # handshakes now
            send_frame(sock, encode_hello(self.requested_id))
            status, assigned = decode_welcome(recv_frame(sock) or b"")
            if status != 0:
                raise ConnectionRefusedError(
                    f"tmemd at {self.address} refused client {self._requested_name()}: {refusal_text(status)}")
            if self.requested_id == CLIENT_ANY and assigned is None:
                raise ProtocolError(f"tmemd at {self.address} cannot assign client ids (too old): name one explicitly")
        except OSError:
            sock.close()
            raise
        self.client_id = self.requested_id if assigned is None else assigned
        self._sock = sock
        return sock

    def _requested_name(self) -> str:
        return "any" if self.requested_id == CLIENT_ANY else str(self.requested_id)

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "RemoteTmem":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
