"""TCP is TLS with client certificates: the certificate's subject is the principal. Real certificates (made
with openssl for this module), a real TmemServer and a real tmemd, real TLS clients."""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers import Pki, pki, start_tmemd  # noqa: F401 (the pki fixture)
from tests.polling import wait_for
from tmemcore import abi, wire
from tmemcore.server import TmemServer
from tmemcore.tmem import Tmem
from tmemcore.trust import ServerTls
from tmemcore.wire import RemoteTmem, TlsConfig, TlsConfigError

pytestmark = pytest.mark.timeout(60)
PAGE = bytes(range(256)) * 16
ATTEMPTS = 20


def tls_for(pki: Pki, name: str) -> TlsConfig:  # noqa: F811
    cert, key = pki.client(name)
    return TlsConfig(cert, key, pki.ca)


@pytest.fixture
def served(pki: Pki) -> Iterator[tuple[Tmem, TmemServer, str]]:  # noqa: F811
    host = Tmem(memory_pages=32)
    tls = ServerTls(pki.server_cert, pki.server_key, pki.ca, frozenset({"O=tmem,CN=ops"}))
    server = TmemServer(host, "tcp:127.0.0.1:0", tls=tls)
    address = server.start()
    try:
        yield host, server, address
    finally:
        server.stop()
        host.check()


def new_pool() -> bytes:
    return abi.new_pool_record(abi.pool_flags(persistent=True))


def test_a_guest_certificate_is_a_guest(served, pki: Pki):  # noqa: F811
    host, server, address = served
    with RemoteTmem(address, wire.CLIENT_ANY, tls=tls_for(pki, "guest-a")) as guest:
        assert guest.connect() == 1
        assert guest.do_tmem_op(new_pool()) == 0
        assert guest.do_tmem_op(abi.gen_record(abi.TMEM_PUT_PAGE, 0, 3, 4), bytearray(PAGE)) == 1
        page = bytearray(abi.PAGE_SIZE)
        assert guest.do_tmem_op(abi.gen_record(abi.TMEM_GET_PAGE, 0, 3, 4), page) == 1 and page == PAGE
        assert guest.do_tmem_op(abi.control_record(abi.TMEMC_FREEZE, 1)) == -errno.EPERM
    for _ in range(ATTEMPTS):
        with pytest.raises(ConnectionRefusedError, match=r"refused client 0: .*\(-EPERM\)"):
            RemoteTmem(address, 0, tls=tls_for(pki, "guest-a")).connect()
    server.check()


def test_the_control_subject_may_open_control_connections(served, pki: Pki):  # noqa: F811
    host, _, address = served
    with RemoteTmem(address, 0, tls=tls_for(pki, "ops")) as dom0:
        buf = bytearray(4096)
        assert dom0.do_tmem_op(abi.control_record(abi.TMEMC_LIST, arg1=len(buf)), buf) == 0
        assert buf.startswith(b"G=")


def test_an_id_held_by_one_subject_is_refused_to_another(served, pki: Pki):  # noqa: F811
    _, server, address = served
    with RemoteTmem(address, 9, tls=tls_for(pki, "guest-a")) as owner:
        assert owner.do_tmem_op(new_pool()) == 0
        for _ in range(ATTEMPTS):
            with pytest.raises(ConnectionRefusedError, match=r"refused client 9: .*\(-EPERM\)"):
                RemoteTmem(address, 9, tls=tls_for(pki, "guest-b")).connect()
        with RemoteTmem(address, 9, tls=tls_for(pki, "guest-a")) as again:  # the same subject may share it
            assert again.connect() == 9
    server.check()


def plain_tcp(address: str) -> socket.socket:
    return socket.create_connection(wire.parse_address(address).sockaddr, timeout=5)


def test_peers_without_a_certificate_of_our_ca_are_refused(served, pki: Pki, caplog: pytest.LogCaptureFixture):  # noqa: F811
    _, server, address = served
    no_cert = ssl.create_default_context(cafile=pki.ca)
    rogue_cert, rogue_key = pki.client("rogue-ops")  # the control subject, from another CA
    rogue = ssl.create_default_context(cafile=pki.ca)
    rogue.load_cert_chain(rogue_cert, rogue_key)
    with caplog.at_level(logging.WARNING, logger="tmemd"):
        for context in [no_cert] * ATTEMPTS + [rogue] * ATTEMPTS:
            with pytest.raises(OSError):  # the handshake fails, or (TLS 1.3) the first read gets the alert
                with context.wrap_socket(plain_tcp(address), server_hostname="127.0.0.1") as sock:
                    wire.send_frame(sock, wire.encode_hello(0))
                    wire.recv_frame(sock)
        for _ in range(ATTEMPTS):  # a plaintext hello on the TLS port
            with plain_tcp(address) as sock:
                wire.send_frame(sock, wire.encode_hello(0))
                try:
                    assert sock.recv(64) == b""
                except ConnectionResetError:
                    pass  # refused by a reset: fine too
        assert wait_for(lambda: sum("handshake failed" in r.getMessage() for r in caplog.records) == 3 * ATTEMPTS)
    assert server.client_ids() == {}
    server.check()


def test_the_client_checks_the_servers_certificate(served, pki: Pki):  # noqa: F811
    _, _, address = served
    cert, key = pki.client("guest-a")
    wrong_name = TlsConfig(cert, key, pki.ca, server_name="tmemd.example")
    with pytest.raises(ssl.SSLCertVerificationError):
        RemoteTmem(address, 1, tls=wrong_name).connect()
    other_ca = TlsConfig(cert, key, str(pki.directory / "rogue-ca.pem"))
    with pytest.raises(ssl.SSLCertVerificationError):
        RemoteTmem(address, 1, tls=other_ca).connect()


def test_unusable_tls_files_are_one_line_errors(pki: Pki, tmp_path: Path):  # noqa: F811
    cert, key = pki.client("guest-a")
    with pytest.raises(TlsConfigError, match="cannot use TLS files") as caught:
        RemoteTmem("tcp:127.0.0.1:1", 1, tls=TlsConfig(cert, str(tmp_path / "missing.key"), pki.ca))
    assert "\n" not in str(caught.value)
    with pytest.raises(TlsConfigError, match="cannot use TLS files"):
        RemoteTmem("tcp:127.0.0.1:1", 1, tls=TlsConfig(key, cert, pki.ca))  # swapped
    with pytest.raises(ValueError, match="TLS is for tcp"):
        RemoteTmem("unix:/tmp/x.sock", 1, tls=TlsConfig(cert, key, pki.ca))


# ---------------------------------------------------------------- tmemd with TLS, for real


def test_tmemd_with_tls(tmp_path: Path, pki: Pki):  # noqa: F811
    daemon = start_tmemd(tmp_path, "tcp:127.0.0.1:0", "--tls-cert", pki.server_cert, "--tls-key", pki.server_key,
                         "--tls-ca", pki.ca, "--tls-control-subject", "o = tmem, commonName = ops")
    try:
        with RemoteTmem(daemon.address, wire.CLIENT_ANY, tls=tls_for(pki, "guest-b")) as guest:
            assert guest.connect() == 1 and guest.do_tmem_op(new_pool()) == 0
            with pytest.raises(ConnectionRefusedError, match="-EPERM"):
                RemoteTmem(daemon.address, 0, tls=tls_for(pki, "guest-b")).connect()
            with RemoteTmem(daemon.address, 0, tls=tls_for(pki, "ops")) as dom0:
                buf = bytearray(4096)
                assert dom0.do_tmem_op(abi.control_record(abi.TMEMC_LIST, arg1=4096), buf) == 0
                assert b"P=CI:1,PI:0" in buf
        with plain_tcp(daemon.address) as sock:  # no certificate at all
            wire.send_frame(sock, wire.encode_hello(0))
            try:
                assert sock.recv(64) == b""
            except ConnectionResetError:
                pass
        assert daemon.wait_log("handshake failed")
        log = daemon.log_text()
        assert "control subjects: O=tmem,CN=ops" in log and "refusing tcp 127.0.0.1:" in log
        assert daemon.stop() == 0
    finally:
        daemon.kill()


@pytest.mark.parametrize("flags, message", [
    (["--listen", "tcp:127.0.0.1:0"], "needs TLS (--tls-cert, --tls-key, --tls-ca)"),
    (["--listen", "tcp:127.0.0.1:0", "--tls-cert", "c.pem"], "TLS needs --tls-cert, --tls-key, --tls-ca: "
                                                           "--tls-key and --tls-ca missing"),
    (["--listen", "tcp:0.0.0.0:0", "--insecure-tcp"], "--insecure-tcp listens on 127.0.0.1 only"),
    (["--listen", "unix:/tmp/never.sock", "--insecure-tcp"], "--insecure-tcp: for tcp: addresses"),
    (["--listen", "tcp:127.0.0.1:0", "--insecure-tcp", "--tls-control-subject", "CN=x"],
     "--tls-control-subject needs TLS"),
    (["--listen", "tcp:127.0.0.1:0", "--insecure-tcp", "--socket-mode", "0666"], "are for unix: sockets"),
    (["--listen", "unix:/tmp/never.sock", "--socket-mode", "999"], "expected an octal mode"),
    (["--listen", "unix:/tmp/never.sock", "--group", "no-such-group-here"], "no group 'no-such-group-here'"),
    (["--listen", "unix:/tmp/never.sock", "--max-per-principal", "0"], "expected a whole number >= 1"),
    (["--listen", "tcp:127.0.0.1:0", "--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key",
      "--tls-ca", "/nonexistent.ca"], "cannot use TLS files"),
])
def test_tmemd_transport_usage_errors(flags: list[str], message: str):
    result = subprocess.run([sys.executable, "-m", "tmemcore.server", *flags], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and result.stderr.startswith("tmemd: "), result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_tmemd_says_insecure_tcp_at_start(tmp_path: Path):
    daemon = start_tmemd(tmp_path, "tcp:127.0.0.1:0", "--insecure-tcp")
    try:
        assert daemon.wait_log("INSECURE: --insecure-tcp")
        assert daemon.address in daemon.log_text().split("INSECURE", 1)[1].splitlines()[0]
    finally:
        daemon.kill()
