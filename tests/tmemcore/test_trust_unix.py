"""Identity on a unix socket is the peer's uid (SO_PEERCRED), never the hello: a real TmemServer and real
peers, one of them a process running as ``nobody``."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from peers import NOBODY, ForeignPeer, hello_step, need_root, op_step, open_dir, raw_hello  # noqa: F401 (fixture)
from tests.polling import wait_for
from tmemcore import abi, wire
from tmemcore.server import TmemServer
from tmemcore.tmem import Tmem
from tmemcore.wire import RemoteTmem

pytestmark = pytest.mark.timeout(60)
PAGE = bytes(range(256)) * 16
UUID = (0xC0FFEE, 0xFACE)
ATTEMPTS = 20  # impersonation attempts per kind: every one must be refused


@dataclass
class Served:
    host: Tmem
    server: TmemServer
    address: str
    path: Path


@pytest.fixture
def served(open_dir: Path) -> Iterator[Served]:  # noqa: F811 (the fixture)
    """A real host behind a unix socket any uid may connect to (mode 0666), so the uid alone decides."""
    host = Tmem(memory_pages=64, shared_auth=True, shared_auth_strict=True)
    path = open_dir / "tmemd.sock"
    server = TmemServer(host, f"unix:{path}", socket_mode=0o666)
    address = server.start()
    try:
        yield Served(host, server, address, path)
    finally:
        server.stop()
        host.check()


def new_pool(shared: bool = False, uuid: tuple[int, int] = (0, 0), persistent: bool = False) -> bytes:
    return abi.new_pool_record(abi.pool_flags(persistent=persistent, shared=shared), uuid=uuid)


def put(pool: int, oid: int, index: int) -> bytes:
    return abi.gen_record(abi.TMEM_PUT_PAGE, pool, oid, index)


def get(pool: int, oid: int, index: int) -> bytes:
    return abi.gen_record(abi.TMEM_GET_PAGE, pool, oid, index)


def test_the_socket_file_is_0660_by_default_and_a_foreign_uid_cannot_connect(open_dir: Path):  # noqa: F811
    need_root()
    path = open_dir / "default.sock"
    server = TmemServer(Tmem(memory_pages=4), f"unix:{path}")
    address = server.start()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        with ForeignPeer(address, [hello_step(wire.CLIENT_ANY)]) as peer:
            assert peer.results == [{"error": "PermissionError"}]  # the file mode, before tmemd sees anything
    finally:
        server.stop()


def test_group_widens_the_socket_to_that_group(open_dir: Path):  # noqa: F811
    need_root()
    path = open_dir / "group.sock"
    server = TmemServer(Tmem(memory_pages=4), f"unix:{path}", socket_group=NOBODY)
    address = server.start()
    try:
        assert os.stat(path).st_gid == NOBODY and stat.S_IMODE(os.stat(path).st_mode) == 0o660
        with ForeignPeer(address, [hello_step(wire.CLIENT_ANY)]) as peer:
            assert peer.results[0]["status"] == 0 and peer.results[0]["assigned"] == 1
    finally:
        server.stop()


def test_a_foreign_uid_cannot_name_client_0(served: Served, caplog: pytest.LogCaptureFixture):
    need_root()
    list_record = abi.control_record(abi.TMEMC_LIST, arg1=4096)
    with caplog.at_level(logging.WARNING, logger="tmemd"):
        with ForeignPeer(served.address, [hello_step(0)] * ATTEMPTS + [hello_step(wire.CLIENT_ANY),
                                                                        op_step(0, list_record, bytearray(4096))]) as peer:
            assert [r["status"] for r in peer.results[:ATTEMPTS]] == [-errno.EPERM] * ATTEMPTS
            welcomed, listing = peer.results[ATTEMPTS:]
            assert welcomed["status"] == 0 and welcomed["assigned"] >= 1
            assert listing["rc"] == -errno.EPERM  # LIST: control connections only
            assert bytes.fromhex(listing["buffer"]) == bytes(4096)  # (a control reply carries its buffer: unwritten)
    refusals = [r.getMessage() for r in caplog.records if "as client 0" in r.getMessage()]
    assert len(refusals) == ATTEMPTS and f"uid {NOBODY} pid" in refusals[0] and "(-EPERM)" in refusals[0]
    assert served.server.client_ids() == {}
    served.server.check()


def test_a_foreign_uid_cannot_take_or_share_a_held_id(served: Served):
    need_root()
    with RemoteTmem(served.address, 7) as owner:
        assert owner.do_tmem_op(new_pool(persistent=True)) == 0
        assert owner.do_tmem_op(put(0, 1, 1), bytearray(PAGE)) == 1
        with ForeignPeer(served.address, [hello_step(7)] * ATTEMPTS + [hello_step(wire.CLIENT_ANY)]) as peer:
            assert [r["status"] for r in peer.results[:ATTEMPTS]] == [-errno.EPERM] * ATTEMPTS
            assert peer.results[-1]["status"] == 0 and peer.results[-1]["assigned"] not in (0, 7)
        page = bytearray(abi.PAGE_SIZE)
        assert owner.do_tmem_op(get(0, 1, 1), page) == 1 and page == PAGE  # untouched
        with RemoteTmem(served.address, 7) as second:  # the same uid may open a second connection as 7
            assert second.connect() == 7 and served.server.client_ids() == {7: 2}
    assert wait_for(lambda: served.server.client_ids() == {})
    with ForeignPeer(served.address, [hello_step(7)]) as peer:  # its holder gone, 7 is anyone's
        assert peer.results[0]["status"] == 0
    served.server.check()


def test_a_restored_client_is_not_handed_to_a_guest(served: Served):
    """A client the host holds pools for while no connection holds its id (a restore made it): CLIENT_ANY
    skips it and only a control principal may claim it (its persistent pages would go to anyone)."""
    need_root()
    served.host.client(1).new_pool(persistent=True).put(5, 5, PAGE)
    with ForeignPeer(served.address, [hello_step(1)] * ATTEMPTS + [hello_step(wire.CLIENT_ANY)]) as peer:
        assert [r["status"] for r in peer.results[:ATTEMPTS]] == [-errno.EPERM] * ATTEMPTS
        assert peer.results[-1]["assigned"] == 2
    with RemoteTmem(served.address, 1) as dom0_tool:  # root: a control principal
        page = bytearray(abi.PAGE_SIZE)
        assert dom0_tool.do_tmem_op(get(0, 5, 5), page) == 1 and page == PAGE


def test_shared_pools_need_a_grant_and_the_grant_dies_with_its_guest(served: Served, caplog: pytest.LogCaptureFixture):
    need_root()
    auth = abi.TmemOp(abi.TMEM_AUTH, 0, uuid=UUID, flags=1, arg1=3).encode()
    with caplog.at_level(logging.WARNING, logger="tmemd"):
        with ForeignPeer(served.address, [hello_step(3)] + [op_step(0, new_pool(True, UUID))] * ATTEMPTS) as peer:
            assert [r["rc"] for r in peer.results[1:]] == [-errno.EPERM] * ATTEMPTS
    assert sum("NEW_POOL of the shared pool" in r.getMessage() for r in caplog.records) == ATTEMPTS
    assert served.host.stats()["shared"] == []
    with RemoteTmem(served.address, 0) as dom0:
        assert dom0.do_tmem_op(auth) == 1  # before client 3 exists again: the grant waits for it
        with ForeignPeer(served.address, [hello_step(3), op_step(0, new_pool(True, UUID)),
                                          hello_step(4), op_step(1, new_pool(True, UUID))]) as peer:
            assert peer.results[1]["rc"] == 0 and served.host.clients[3].pools[0].shared
            assert peer.results[3]["rc"] == -errno.EPERM  # the grant is client 3's, not its uid's
        # the guest holding 3 left: its pools went and so did its grant
        assert wait_for(lambda: served.server.client_ids() == {0: 1})
        assert UUID not in served.host.clients[3].auth_uuids and served.host.pending_auth == {}
        with RemoteTmem(served.address, 3) as next_holder:
            assert next_holder.do_tmem_op(new_pool(True, UUID)) == -errno.EPERM
    served.server.check()


def test_root_is_no_control_principal_when_not_configured_so(open_dir: Path):  # noqa: F811
    """The uid decides, not the hello: with no control uids even root's hello for client 0 is refused."""
    path = open_dir / "nocontrol.sock"
    server = TmemServer(Tmem(memory_pages=4), f"unix:{path}", control_uids=frozenset())
    address = server.start()
    try:
        assert [raw_hello(address, 0)[0] for _ in range(ATTEMPTS)] == [-errno.EPERM] * ATTEMPTS
        with pytest.raises(ConnectionRefusedError, match=r"refused client 0: Operation not permitted \(-EPERM\)"):
            RemoteTmem(address, 0).connect()
        assert raw_hello(address, wire.CLIENT_ANY) == (0, 1)
    finally:
        server.stop()


def test_tcp_needs_tls_or_an_explicit_insecure_loopback():
    host = Tmem(memory_pages=4)
    with pytest.raises(ValueError, match="needs TLS"):
        TmemServer(host, "tcp:127.0.0.1:0")
    with pytest.raises(ValueError, match="127.0.0.1 only"):
        TmemServer(host, "tcp:0.0.0.0:0", insecure_tcp=True)
    with pytest.raises(ValueError, match="authenticates peers by uid"):
        TmemServer(host, "unix:/tmp/x.sock", insecure_tcp=True)


def test_insecure_tcp_says_so_at_start(caplog: pytest.LogCaptureFixture):
    server = TmemServer(Tmem(memory_pages=4), "tcp:127.0.0.1:0", insecure_tcp=True)
    with caplog.at_level(logging.WARNING, logger="tmemd"):
        address = server.start()
    try:
        assert any("INSECURE" in r.getMessage() and address in r.getMessage() for r in caplog.records)
        assert raw_hello(address, 0) == (0, None)  # today's behaviour, on loopback only
    finally:
        server.stop()


def test_a_unix_peer_that_vanishes_at_accept_costs_nothing(served: Served):
    for _ in range(20):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(served.path))
        sock.close()
    assert wait_for(lambda: served.server.connection_count() == 0)
    assert raw_hello(served.address, wire.CLIENT_ANY)[0] == 0


@pytest.mark.parametrize("shared_auth", [True, False])
def test_tmemd_shared_auth_flag(tmp_path: Path, shared_auth: bool, capsys: pytest.CaptureFixture[str]):
    """tmemd --shared-auth: a shared NEW_POOL is -EPERM until `tmemctl auth CLIENT UUID`; without the flag
    any guest may share (Xen's default, tmem_shared_auth off)."""
    from peers import start_tmemd
    from tmemcore.cli import main as tmemctl
    from tmemcore.client import uuid_text

    daemon = start_tmemd(tmp_path, f"unix:{tmp_path}/tmemd.sock", *(["--shared-auth"] if shared_auth else []))
    try:
        with RemoteTmem(daemon.address, 5) as guest:
            first = guest.do_tmem_op(new_pool(True, UUID))
            assert first == (-errno.EPERM if shared_auth else 0)
            if shared_auth:
                assert daemon.wait_log(f"NEW_POOL of the shared pool {uuid_text(UUID)} refused")
                assert tmemctl(["--server", daemon.address, "auth", "5", uuid_text(UUID)]) == 0
                assert guest.do_tmem_op(new_pool(True, UUID)) == 0
            assert tmemctl(["--server", daemon.address, "list"]) == 0
            assert f"U0:{UUID[0]:x},U1:{UUID[1]:x},SC:5" in capsys.readouterr().out
    finally:
        daemon.kill()
