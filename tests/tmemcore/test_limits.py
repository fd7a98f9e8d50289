"""No denial of service by connection slots: per-principal limits, control slots apart from the guests',
pending connections that give way, a long listen queue, and no idle limit for a guest that said hello."""

from __future__ import annotations

import errno
import socket
import struct
import time
from pathlib import Path

import pytest

from peers import (  # noqa: F401 (fixtures)
    NOBODY, ForeignPeer, Pki, hello_step, need_root, open_dir, pki, raw_hello, silent_step, start_tmemd,
)
from tests.polling import wait_for
from tmemcore import abi, wire
from tmemcore.server import LISTEN_BACKLOG, TmemServer
from tmemcore.tmem import Tmem
from tmemcore.trust import Limits, ServerTls
from tmemcore.wire import RemoteTmem, TlsConfig

pytestmark = pytest.mark.timeout(90)
PAGE = bytes(range(256)) * 16
OTHER_USER = 1  # "daemon" on Debian: a second unprivileged principal


def list_ok(address: str) -> bool:
    """A control connection gets in and LIST works (what tmemctl list does)."""
    with RemoteTmem(address, 0, timeout=5) as dom0:
        buf = bytearray(1 << 16)
        return dom0.do_tmem_op(abi.control_record(abi.TMEMC_LIST, arg1=len(buf)), buf) == 0 and buf.startswith(b"G=")


def test_one_user_with_64_idle_guests_locks_out_nobody_else(open_dir: Path):  # noqa: F811
    """The audit's lockout, as a new user would try it against a real tmemd: 64 connections that say hello
    and idle (and more that never speak) used to lock every later guest and tmemctl out for good."""
    need_root()
    daemon = start_tmemd(open_dir, f"unix:{open_dir}/tmemd.sock", "--socket-mode", "0666")
    try:
        plan = [hello_step(wire.CLIENT_ANY)] * 66 + [silent_step()] * 40
        with ForeignPeer(daemon.address, plan) as flood:
            statuses = [r["status"] for r in flood.results[:66]]
            assert statuses == [0] * 64 + [-errno.EBUSY] * 2  # its own limit, not everyone's
            started = time.monotonic()
            assert list_ok(daemon.address)  # tmemctl: a control slot
            assert raw_hello(daemon.address, wire.CLIENT_ANY)[0] == 0  # root's guests
            with ForeignPeer(daemon.address, [hello_step(wire.CLIENT_ANY)], uid=OTHER_USER) as other:
                assert other.results[0]["status"] == 0  # another user's guest
            assert time.monotonic() - started < 4  # at once, not after the silent sockets' hello timeout
        log = daemon.log_text()
        assert f"uid:{NOBODY} holds its limit of 64 guest connections" in log
    finally:
        daemon.kill()


def test_silent_sockets_give_way_to_a_real_guest():
    """More silent sockets than pending slots: the oldest give way, so a guest gets in at once (it used to
    wait up to the 5 s hello timeout, or for good before there was one)."""
    limits = Limits(pending=16, pending_per_peer=16, hello_timeout=30.0)
    server = TmemServer(Tmem(memory_pages=4), "tcp:127.0.0.1:0", limits=limits, insecure_tcp=True)
    address = server.start()
    silent = []
    try:
        for _ in range(48):
            silent.append(socket.create_connection(wire.parse_address(address).sockaddr, timeout=5))
        assert wait_for(lambda: server.connection_count() == 16)
        started = time.monotonic()
        assert raw_hello(address, wire.CLIENT_ANY)[0] == 0
        assert time.monotonic() - started < 2
        dropped = sum(1 for sock in silent[:32] if _closed(sock))
        assert dropped == 32  # the 32 oldest were shut down, the newest 16 (minus the guest's turn) wait
        server.check()
    finally:
        for sock in silent:
            sock.close()
        server.stop()


def _closed(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_a_tcp_peer_gets_a_share_of_the_pending_slots(pki: Pki):  # noqa: F811
    """Before its TLS handshake a TCP peer is only an address: its silent sockets beyond its share of the
    pending slots displace its own oldest, and a real guest still gets in at once."""
    limits = Limits(pending=64, pending_per_peer=4, hello_timeout=30.0)
    tls = ServerTls(pki.server_cert, pki.server_key, pki.ca)
    server = TmemServer(Tmem(memory_pages=4), "tcp:127.0.0.1:0", limits=limits, tls=tls)
    address = server.start()
    socks = []
    try:
        socks = [socket.create_connection(wire.parse_address(address).sockaddr, timeout=5) for _ in range(12)]
        assert sum(_closed(sock) for sock in socks[:8]) == 8  # the peer's 8 oldest gave way
        assert server.connection_count() == 4
        cert, key = pki.client("guest-a")
        started = time.monotonic()
        with RemoteTmem(address, wire.CLIENT_ANY, tls=TlsConfig(cert, key, pki.ca)) as guest:
            assert guest.connect() == 1
        assert time.monotonic() - started < 2
        server.check()
    finally:
        for sock in socks:
            sock.close()
        server.stop()


def test_control_keeps_its_slots_when_the_guests_have_all_of_theirs(tmp_path: Path):
    server = TmemServer(Tmem(memory_pages=4), f"unix:{tmp_path}/s.sock", limits=Limits(guests=4, control=2))
    address = server.start()
    guests = [RemoteTmem(address, wire.CLIENT_ANY) for _ in range(4)]
    try:
        assert [guest.connect() for guest in guests] == [1, 2, 3, 4]
        with pytest.raises(ConnectionRefusedError, match=r"Device or resource busy \(-EBUSY\)"):
            RemoteTmem(address, wire.CLIENT_ANY).connect()
        assert list_ok(address) and list_ok(address)
        guests[0].close()
        assert wait_for(lambda: server.client_ids().get(1) is None)
        assert RemoteTmem(address, wire.CLIENT_ANY).connect() == 1
        server.check()
    finally:
        for guest in guests:
            guest.close()
        server.stop()


def test_the_listen_queue_holds_a_burst_of_at_least_128(tmp_path: Path):
    """The backlog was 16: a burst of guests connecting while the accept thread was busy got refused."""
    server = TmemServer(Tmem(memory_pages=4), f"unix:{tmp_path}/s.sock")
    listener = server._bind()  # listening, nothing accepting: the kernel's queue alone holds the connects
    queued = []
    try:
        for _ in range(200):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(f"{tmp_path}/s.sock")
            except BlockingIOError:  # EAGAIN: the queue is full
                sock.close()
                break
            queued.append(sock)
        assert len(queued) >= 128 and LISTEN_BACKLOG >= 128
    finally:
        for sock in queued:
            sock.close()
        listener.close()


def test_an_idle_guest_keeps_its_connection_and_its_pages(tmp_path: Path):
    """The hello has a deadline; a guest that said hello has none: idle for many hello timeouts, it keeps
    its connection, its pools and its pages."""
    host = Tmem(memory_pages=8)
    server = TmemServer(host, f"unix:{tmp_path}/s.sock", hello_timeout=0.2)
    address = server.start()
    try:
        with RemoteTmem(address, wire.CLIENT_ANY) as guest:
            assert guest.do_tmem_op(abi.new_pool_record(abi.pool_flags(persistent=True))) == 0
            assert guest.do_tmem_op(abi.gen_record(abi.TMEM_PUT_PAGE, 0, 1, 1), bytearray(PAGE)) == 1
            # polled: were it cut off, the count would drop within one hello timeout
            assert not wait_for(lambda: server.connection_count() == 0, timeout=1.0)
            page = bytearray(abi.PAGE_SIZE)
            assert guest.do_tmem_op(abi.gen_record(abi.TMEM_GET_PAGE, 0, 1, 1), page) == 1 and page == PAGE
    finally:
        server.stop()


def test_a_slow_peer_mid_frame_holds_up_only_itself(tmp_path: Path):
    """A guest that sends half a request and stalls keeps its own slot; everyone else is served meanwhile."""
    server = TmemServer(Tmem(memory_pages=8), f"unix:{tmp_path}/s.sock")
    address = server.start()
    try:
        slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        slow.connect(f"{tmp_path}/s.sock")
        wire.send_frame(slow, wire.encode_hello(wire.CLIENT_ANY))
        assert wire.decode_welcome(wire.recv_frame(slow) or b"")[0] == 0
        request = wire.encode_request(abi.gen_record(abi.TMEM_PUT_PAGE, 0, 1, 1), bytearray(PAGE))
        slow.sendall(struct.pack("<I", len(request)) + request[:100])  # and never the rest
        started = time.monotonic()
        with RemoteTmem(address, wire.CLIENT_ANY, timeout=5) as other:
            assert other.do_tmem_op(abi.new_pool_record(abi.pool_flags())) == 0
            for index in range(50):
                assert other.do_tmem_op(abi.gen_record(abi.TMEM_PUT_PAGE, 0, 1, index), bytearray(PAGE)) == 1
        assert time.monotonic() - started < 2
        slow.close()
        assert wait_for(lambda: server.connection_count() == 0)
        server.check()
    finally:
        server.stop()
