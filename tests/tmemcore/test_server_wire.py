"""The wire protocol and TmemServer in-process, against a recording test-double host."""

from __future__ import annotations

import errno
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.polling import wait_for
from tmemcore import abi, wire
from tmemcore.server import TmemServer, answer
from tmemcore.sizes import parse_size
from tmemcore.wire import RemoteTmem

pytestmark = pytest.mark.timeout(30)


class EchoHost:
    """Records calls; GET fills the page with the client id byte and hits; CONTROL writes "ok"."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, bytes, bytes | None]] = []
        self.lock = threading.Lock()

    def do_tmem_op(self, client_id: int, op: bytes, page: bytearray | None = None) -> int:
        with self.lock:
            self.calls.append((client_id, bytes(op), None if page is None else bytes(page)))
        (cmd,) = struct.unpack_from("<I", op)
        if cmd == abi.TMEM_GET_PAGE:
            (index,) = struct.unpack_from("<I", op, 32)
            if index == 0:
                return abi.RC_MISS
            page[:] = bytes([client_id]) * len(page)
            return abi.RC_HIT
        if cmd == abi.TMEM_CONTROL and page is not None:
            page[:2] = b"ok"
            return 0
        if cmd == abi.TMEM_PUT_PAGE:
            return abi.RC_HIT
        return -38


@pytest.fixture
def served(tmp_path: Path):
    host = EchoHost()
    server = TmemServer(host, "tcp:127.0.0.1:0", insecure_tcp=True)
    address = server.start()
    try:
        yield host, server, address
    finally:
        server.stop()


def get_record(index: int) -> bytes:
    return abi.gen_record(abi.TMEM_GET_PAGE, 0, 5, index)


# ---------------------------------------------------------------- pure codec


def test_addresses_parse_and_print_back():
    assert str(wire.parse_address("tcp:127.0.0.1:7077")) == "tcp:127.0.0.1:7077"
    assert str(wire.parse_address("tcp:[::1]:1")) == "tcp:[::1]:1"
    assert str(wire.parse_address("unix:/run/tmemd.sock")) == "unix:/run/tmemd.sock"
    for bad in ("", "tcp:localhost", "tcp:host:99999", "unix:", "http://x"):
        with pytest.raises(ValueError, match="bad address"):
            wire.parse_address(bad)


def test_request_round_trip_and_buffer_modes():
    put = abi.gen_record(abi.TMEM_PUT_PAGE, 1, 2, 3)
    page = bytearray(b"x" * abi.PAGE_SIZE)
    request = wire.decode_request(wire.encode_request(put, page))
    assert (request.op, request.mode, request.buffer) == (put, wire.BUF_SEND, page)
    get = wire.encode_request(get_record(1), bytearray(abi.PAGE_SIZE))
    assert len(get) == 6 + 56  # GET sends the size, not 4 KiB of stale bytes
    assert wire.decode_request(get).buffer == bytearray(abi.PAGE_SIZE)
    assert wire.decode_request(wire.encode_request(put, None)).buffer is None


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x01", struct.pack("<BBI", 9, 56, 0) + bytes(56), struct.pack("<BBI", 1, 56, 10) + bytes(56),
     struct.pack("<BBI", 0, 56, 5) + bytes(56), struct.pack("<BBI", 2, 200, 0) + bytes(200)],
)
def test_inconsistent_requests_are_protocol_errors(payload: bytes):
    with pytest.raises(wire.ProtocolError):
        wire.decode_request(payload)


def test_answer_returns_the_buffer_only_when_the_host_wrote_it():
    host = EchoHost()
    hit = wire.decode_response(answer(host, 7, wire.encode_request(get_record(1), bytearray(8))))
    assert hit == (1, b"\x07" * 8)
    miss = wire.decode_response(answer(host, 7, wire.encode_request(get_record(0), bytearray(8))))
    assert miss == (0, None)
    put = abi.gen_record(abi.TMEM_PUT_PAGE, 0, 1, 1)
    assert wire.decode_response(answer(host, 7, wire.encode_request(put, bytearray(8)))) == (1, None)
    assert host.calls[-1] == (7, put, bytes(8))


def test_hello_rejects_foreign_bytes():
    with pytest.raises(wire.ProtocolError):
        wire.decode_hello(b"GET / HTTP/1.1\r\n")
    assert wire.decode_hello(wire.encode_hello(3)) == 3
    with pytest.raises(ValueError):
        wire.encode_hello(70000)


def test_parse_size():
    assert parse_size("64M") == 64 << 20 and parse_size("4096") == 4096 and parse_size("1GiB") == 1 << 30
    with pytest.raises(ValueError, match="invalid size"):
        parse_size("lots")


# ---------------------------------------------------------------- live server


def test_remote_get_fills_the_page_in_place(served):
    host, server, address = served
    remote = RemoteTmem(address, 4)
    try:
        page = bytearray(abi.PAGE_SIZE)
        assert remote.do_tmem_op(get_record(1), page) == 1
        assert page == b"\x04" * abi.PAGE_SIZE
        untouched = bytearray(b"z" * abi.PAGE_SIZE)
        assert remote.do_tmem_op(get_record(0), untouched) == 0
        assert untouched == b"z" * abi.PAGE_SIZE
        assert remote.do_tmem_op(abi.gen_record(abi.TMEM_PUT_PAGE, 0, 1, 1), bytearray(b"p" * 4096)) == 1
        assert host.calls[-1][0] == 4 and host.calls[-1][2] == b"p" * 4096
        remote.check()
    finally:
        remote.close()


def test_control_buffer_comes_back(served):
    _, _, address = served
    with RemoteTmem(address, 0) as remote:
        buf = bytearray(16)
        assert remote.do_tmem_op(abi.control_record(abi.TMEMC_LIST, arg1=16), buf) == 0
        assert buf[:2] == b"ok"


def test_malformed_frame_drops_only_that_connection(served):
    host, server, address = served
    parsed = wire.parse_address(address)
    with socket.create_connection(parsed.sockaddr, timeout=5) as bad:
        bad.sendall(struct.pack("<I", wire.MAX_PAYLOAD + 1))
        assert bad.recv(16) == b""  # the server closed it
    with socket.create_connection(parsed.sockaddr, timeout=5) as bad:
        wire.send_frame(bad, b"not a hello at all")
        try:  # refused on its declared length, with the payload unread: a close or a reset
            assert bad.recv(16) == b""
        except ConnectionResetError:
            pass
    with RemoteTmem(address, 2) as remote:  # the server still serves others
        assert remote.do_tmem_op(get_record(1), bytearray(4)) == 1
    server.check()


def test_many_threads_share_one_remote(served):
    host, _, address = served
    remote = RemoteTmem(address, 9)
    results: list[int] = []

    def worker() -> None:
        for _ in range(20):
            page = bytearray(64)
            results.append(remote.do_tmem_op(get_record(1), page))
            assert page == b"\x09" * 64

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    remote.close()
    assert results == [1] * 80


def test_stopped_server_gives_a_quick_transport_error_then_reconnects(tmp_path: Path):
    host = EchoHost()
    socket_path = tmp_path / "tmemd.sock"
    server = TmemServer(host, f"unix:{socket_path}")
    address = server.start()
    remote = RemoteTmem(address, 1, timeout=2.0)
    assert remote.do_tmem_op(get_record(1), bytearray(4)) == 1
    server.stop()
    assert not socket_path.exists()
    started = time.monotonic()
    with pytest.raises(OSError):
        remote.do_tmem_op(get_record(1), bytearray(4))
    assert time.monotonic() - started < 1.5
    assert not remote.connected
    server = TmemServer(host, f"unix:{socket_path}")
    server.start()
    try:
        assert remote.do_tmem_op(get_record(1), bytearray(4)) == 1  # lazily reconnected
    finally:
        remote.close()
        server.stop()


def test_unix_listen_refuses_to_clobber_a_regular_file(tmp_path: Path):
    path = tmp_path / "not-a-socket"
    path.write_text("keep me")
    with pytest.raises(FileExistsError):
        TmemServer(EchoHost(), f"unix:{path}").start()
    assert path.read_text() == "keep me"


def test_silent_server_times_out(tmp_path: Path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        remote = RemoteTmem(f"tcp:127.0.0.1:{port}", 1, timeout=0.3)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            remote.do_tmem_op(get_record(1), bytearray(4))  # connect succeeds, no welcome ever comes
        assert time.monotonic() - started < 2


def test_write_only_control_ops_send_only_the_size():
    listing = abi.control_record(abi.TMEMC_LIST, arg1=1 << 20)
    assert wire.buffer_mode_for(listing, bytearray(8)) == wire.BUF_SIZE
    put_back = abi.control_record(abi.TMEMC_RESTORE_PUT_PAGE, 1, arg1=4096)
    assert wire.buffer_mode_for(put_back, bytearray(8)) == wire.BUF_SEND
    v0_listing = abi.control_record(abi.TMEMC_LIST, arg1=16, version=0)
    assert wire.buffer_mode_for(v0_listing, bytearray(8)) == wire.BUF_SIZE
    assert len(wire.encode_request(listing, bytearray(1 << 20))) == 6 + 56


def test_connections_beyond_the_limit_are_refused():
    server = TmemServer(EchoHost(), "tcp:127.0.0.1:0", max_connections=1, insecure_tcp=True)
    address = server.start()
    try:
        first = RemoteTmem(address, 1)
        assert first.do_tmem_op(get_record(1), bytearray(4)) == 1
        assert server.connection_count() == 1
        second = RemoteTmem(address, 2, timeout=2.0)
        with pytest.raises(OSError):
            second.do_tmem_op(get_record(1), bytearray(4))
        first.close()
        assert wait_for(lambda: not server.connection_count(), timeout=5)  # the server noticed the close
        assert second.do_tmem_op(get_record(1), bytearray(4)) == 1
        second.close()
        server.check()
    finally:
        server.stop()


def test_connections_that_never_say_hello_cannot_lock_guests_out():
    """64 idle sockets used to hold every slot for good (an audit's lockout of tmemctl and new mounts)."""
    server = TmemServer(EchoHost(), "tcp:127.0.0.1:0", max_connections=2, hello_timeout=0.5, insecure_tcp=True)
    address = server.start()
    host, port = address.split(":")[1:]
    silent = [socket.create_connection((host, int(port)), timeout=5) for _ in range(2)]
    try:
        assert wait_for(lambda: server.connection_count() == 2, timeout=5)
        assert wait_for(lambda: not server.connection_count(), timeout=5)  # both dropped after 0.5 s
        guest = RemoteTmem(address, 1, timeout=2.0)
        assert guest.do_tmem_op(get_record(1), bytearray(4)) == 1
        guest.close()
        server.check()
    finally:
        for sock in silent:
            sock.close()
        server.stop()


def test_a_hello_trickled_byte_by_byte_still_times_out():
    """The hello timeout bounds the whole hello, not each recv: a peer sending a byte now and then
    (or declaring a long first frame) kept its slot for good."""
    server = TmemServer(EchoHost(), "tcp:127.0.0.1:0", max_connections=1, hello_timeout=0.5, insecure_tcp=True)
    address = server.start()
    parsed = wire.parse_address(address)
    try:
        with socket.create_connection(parsed.sockaddr, timeout=5) as slow:
            frame = struct.pack("<I", 12) + wire.encode_hello(1)
            assert wait_for(lambda: server.connection_count() == 1, timeout=5)  # accepted
            started = time.monotonic()
            try:
                for byte in frame[:-1]:  # a byte every 0.15 s (2.25 s in all), never the last one
                    slow.sendall(bytes([byte]))
                    if wait_for(lambda: server.connection_count() == 0, timeout=0.15):
                        break  # dropped
            except OSError:
                pass  # dropped while we were still sending
            assert wait_for(lambda: server.connection_count() == 0, timeout=5)
            assert time.monotonic() - started < 1.5  # well before the trickle would have ended
        guest = RemoteTmem(address, 1, timeout=2.0)
        assert guest.do_tmem_op(get_record(1), bytearray(4)) == 1
        guest.close()
    finally:
        server.stop()


def test_one_save_per_client_and_only_its_own_connection_ends_it():
    """A second SAVE_BEGIN for a client is refused (-EBUSY) while its save is open; the connection that
    began a save ends it when it closes, not one that merely sent SAVE_BEGIN for it earlier."""
    from tmemcore.tmem import Tmem

    host = Tmem(memory_pages=16)
    host.client(8).new_pool(persistent=True).put(7, 0, bytes(4096))
    server = TmemServer(host, "tcp:127.0.0.1:0", insecure_tcp=True)
    address = server.start()
    begin, end = (abi.control_record(subop, 8) for subop in (abi.TMEMC_SAVE_BEGIN, abi.TMEMC_SAVE_END))
    try:
        a, b, c = (RemoteTmem(address, 0, timeout=5.0) for _ in range(3))
        assert a.do_tmem_op(begin) == 1
        assert b.do_tmem_op(begin) == -errno.EBUSY  # was 1, recording a's freeze as the client's own
        assert b.do_tmem_op(end) == 0  # any connection may end it
        assert c.do_tmem_op(begin) == 1  # c's save now
        a.close()  # a's save is over: its end must not end c's
        assert wait_for(lambda: server.connection_count() == 2, timeout=5)
        assert host.client(8).frozen
        c.close()
        assert wait_for(lambda: server.connection_count() == 1, timeout=5)
        assert not host.client(8).frozen
        b.close()
        server.check()
    finally:
        server.stop()


@pytest.mark.parametrize("live", [False, True])
def test_a_save_cut_off_by_its_connection_does_not_leave_the_client_frozen(live: bool):
    """tmemctl killed (or timed out) mid-save left client 8 frozen and live-migrating for good: its puts
    were refused and a duplicate put lost the old copy."""
    from tmemcore.tmem import Tmem

    host = Tmem(memory_pages=16)
    pool = host.client(8).new_pool(persistent=True)
    pool.put(7, 0, bytes(4096))
    server = TmemServer(host, "tcp:127.0.0.1:0", insecure_tcp=True)
    address = server.start()
    try:
        tool = RemoteTmem(address, 0, timeout=5.0)
        assert tool.do_tmem_op(abi.control_record(abi.TMEMC_SAVE_BEGIN, 8, arg1=int(live))) == 1
        assert host.client(8).frozen and host.client(8).live_migrating == live
        tool.close()  # the tool dies before SAVE_END
        assert wait_for(lambda: not server.connection_count(), timeout=5)
        client = host.client(8)
        assert not client.frozen and not client.live_migrating
        pool.put(7, 1, bytes(4096))  # was Frozen
        server.check()
    finally:
        server.stop()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=120))
def test_random_payloads_are_answered_or_refused_as_protocol_errors(payload: bytes):
    from tmemcore.tmem import Tmem

    host = Tmem(memory_pages=4)
    try:
        rc, buffer = wire.decode_response(answer(host, 1, payload))
    except wire.ProtocolError:
        return
    assert isinstance(rc, int) and (buffer is None or isinstance(buffer, bytes))
    host.check()


# ---------------------------------------------------------------- client id assignment, pools per connection


def test_welcome_is_classic_unless_an_id_was_assigned():
    classic = wire.encode_welcome(0)
    assert len(classic) == 14 and wire.decode_welcome(classic) == (0, None)  # what protocol-1 clients expect
    assert wire.decode_welcome(wire.encode_welcome(0, 7)) == (0, 7)
    assert wire.decode_welcome(wire.encode_welcome(-28, 0)) == (-28, 0)
    with pytest.raises(wire.ProtocolError):
        wire.decode_welcome(classic + b"\0")
    assert wire.decode_hello(wire.encode_hello(wire.CLIENT_ANY)) == wire.CLIENT_ANY == 0xFFFF


def test_any_gets_the_lowest_free_id_and_explicit_ids_are_kept(served):
    host, server, address = served
    explicit = RemoteTmem(address, 1)
    first, second = RemoteTmem(address, wire.CLIENT_ANY), RemoteTmem(address, wire.CLIENT_ANY)
    try:
        assert first.client_id == wire.CLIENT_ANY  # not connected yet
        assert explicit.connect() == 1 and first.connect() == 2 and second.connect() == 3
        assert second.do_tmem_op(get_record(1), bytearray(4)) == 1
        assert host.calls[-1][0] == 3  # the server speaks as the assigned id
        first.close()
        assert wait_for(lambda: server.client_ids() == {1: 1, 3: 1})
        again = RemoteTmem(address, wire.CLIENT_ANY)
        assert again.connect() == 2  # freed ids are reused
        again.check()
        again.close()
        server.check()
    finally:
        for remote in (explicit, first, second):
            remote.close()


def test_no_free_client_id_refuses_the_connection(served, monkeypatch: pytest.MonkeyPatch):
    _, _, address = served
    monkeypatch.setattr(wire, "MAX_CLIENT_ID", 1)
    with RemoteTmem(address, wire.CLIENT_ANY) as first:
        assert first.connect() == 1
        with pytest.raises(ConnectionRefusedError, match="refused client any"):
            RemoteTmem(address, wire.CLIENT_ANY).connect()


def test_asking_an_old_server_for_any_id_is_a_clear_error():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]

        def old_server() -> None:  # protocol 1 as it was: always the 14-byte welcome
            conn, _ = listener.accept()
            with conn:
                wire.recv_frame(conn)
                wire.send_frame(conn, wire.encode_welcome(0))

        thread = threading.Thread(target=old_server)
        thread.start()
        with pytest.raises(wire.ProtocolError, match="cannot assign client ids"):
            RemoteTmem(f"tcp:127.0.0.1:{port}", wire.CLIENT_ANY, timeout=5).connect()
        thread.join(10)


def test_a_closed_connection_destroys_exactly_the_pools_it_created(tmp_path: Path):
    from tmemcore.tmem import Tmem

    host = Tmem(memory_pages=64, accept_v0=True)
    server = TmemServer(host, f"unix:{tmp_path}/s.sock")
    address = server.start()
    try:
        v1 = RemoteTmem(address, 5)
        v0 = RemoteTmem(address, 6)
        for remote, version in ((v1, abi.SPEC_V1), (v1, abi.SPEC_V1), (v0, abi.SPEC_V0)):
            assert remote.do_tmem_op(abi.new_pool_record(abi.pool_flags(version=version), version=version)) >= 0
        assert v1.do_tmem_op(abi.gen_record(abi.TMEM_DESTROY_POOL, 0, 0, 0)) == 1  # its own destroy is tracked
        assert v1.do_tmem_op(abi.gen_record(abi.TMEM_PUT_PAGE, 1, 9, 9), bytearray(abi.PAGE_SIZE)) == 1
        v1.close()
        v0.close()

        def pools(cid: int) -> list[int]:
            return [slot for slot, pool in enumerate(host.clients[cid].pools) if pool is not None]

        assert wait_for(lambda: pools(5) == [] and pools(6) == [] and server.client_ids() == {})
        assert host.npages == 0
        host.check()
    finally:
        server.stop()


def test_guest_tracks_new_and_destroyed_pools():
    from tmemcore.server import Guest
    from tmemcore.tmem import Tmem

    guest = Guest(Tmem(memory_pages=8, accept_v0=True), 3)
    new_v0 = wire.encode_request(abi.new_pool_record(abi.pool_flags(version=0), version=0), None)
    wire.decode_response(guest.answer(new_v0))
    wire.decode_response(guest.answer(new_v0))
    assert guest.pools == {0: abi.SPEC_V0, 1: abi.SPEC_V0}
    wire.decode_response(guest.answer(wire.encode_request(abi.gen_record(abi.TMEM_DESTROY_POOL, 0, 0, 0, 0), None)))
    assert guest.pools == {1: abi.SPEC_V0}
    guest.check()
    assert guest.destroy_pools() == [1] and guest.pools == {}


