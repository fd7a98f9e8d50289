"""tmemd for real: a subprocess on loopback, driven through RemoteTmem and tmemctl."""

from __future__ import annotations

import errno
import io
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tmemcore import abi
from tmemcore.cli import main as tmemctl
from tmemcore.savestream import decode_stream, restore_client
from tmemcore.tmem import Tmem
from tmemcore.wire import RemoteTmem

pytestmark = pytest.mark.timeout(60)
START_TIMEOUT = 20.0
PAGE = bytes(range(256)) * 16


@dataclass
class Daemon:
    process: subprocess.Popen[str]
    address: str
    log: Path

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=10)


def start_tmemd(tmp_path: Path, *args: str, listen: str = "tcp:127.0.0.1:0") -> Daemon:
    """A tmemd subprocess; plain TCP on loopback (--insecure-tcp) unless TLS options are given."""
    if listen.startswith("tcp:") and "--tls-cert" not in args:
        args = ("--insecure-tcp", *args)
    ready = tmp_path / "ready"
    log = tmp_path / "tmemd.log"
    ready.unlink(missing_ok=True)
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "tmemcore.server", "--listen", listen, "--memory", "1M",
             "--ready-file", str(ready), *args],
            stdout=subprocess.PIPE, stderr=log_file, text=True,
        )
    deadline = time.monotonic() + START_TIMEOUT
    while not ready.exists():  # poll the ready file with a deadline (no fixed sleep)
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"tmemd did not start: {log.read_text()}")
        time.sleep(0.02)
    return Daemon(process, ready.read_text().strip(), log)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    running = start_tmemd(tmp_path)
    try:
        yield running
    finally:
        running.process.kill()
        running.process.wait(timeout=10)


def new_pool(remote: RemoteTmem, persistent: bool = False, version: int = abi.SPEC_V1) -> int:
    flags = abi.pool_flags(persistent=persistent, version=version)
    return remote.do_tmem_op(abi.new_pool_record(flags, version=version))


def test_new_pool_put_get_over_tcp(daemon: Daemon):
    assert daemon.address.startswith("tcp:127.0.0.1:")
    with RemoteTmem(daemon.address, 1) as remote:
        pool = new_pool(remote)
        assert pool == 0
        assert remote.do_tmem_op(abi.gen_record(abi.TMEM_PUT_PAGE, pool, 42, 3), bytearray(PAGE)) == 1
        page = bytearray(abi.PAGE_SIZE)
        assert remote.do_tmem_op(abi.gen_record(abi.TMEM_GET_PAGE, pool, 42, 3), page) == 1
        assert page == PAGE
        # private ephemeral get is exclusive: the second get misses (on an empty pool: -EEMPTY)
        assert remote.do_tmem_op(abi.gen_record(abi.TMEM_GET_PAGE, pool, 42, 3), page) == -1001
        assert remote.do_tmem_op(abi.gen_record(abi.TMEM_GET_PAGE, 9, 42, 3), page) == -19  # ENODEV


def test_clients_are_separate_connections(daemon: Daemon):
    with RemoteTmem(daemon.address, 1) as one, RemoteTmem(daemon.address, 2) as two:
        assert new_pool(one, persistent=True) == 0 and new_pool(two, persistent=True) == 0
        assert one.do_tmem_op(abi.gen_record(abi.TMEM_PUT_PAGE, 0, 1, 1), bytearray(PAGE)) == 1
        page = bytearray(abi.PAGE_SIZE)
        assert two.do_tmem_op(abi.gen_record(abi.TMEM_GET_PAGE, 0, 1, 1), page) == -1001
        assert one.do_tmem_op(abi.gen_record(abi.TMEM_GET_PAGE, 0, 1, 1), page) == 1


def test_control_from_a_guest_is_refused(daemon: Daemon):
    with RemoteTmem(daemon.address, 3) as guest:
        assert guest.do_tmem_op(abi.control_record(abi.TMEMC_FREEZE, 3)) == -1  # EPERM


def test_killed_server_gives_a_quick_transport_error(daemon: Daemon):
    remote = RemoteTmem(daemon.address, 1, timeout=2.0)
    assert new_pool(remote) == 0
    daemon.process.kill()
    daemon.process.wait(timeout=10)
    started = time.monotonic()
    with pytest.raises((ConnectionError, OSError)):
        remote.do_tmem_op(abi.gen_record(abi.TMEM_PUT_PAGE, 0, 1, 1), bytearray(PAGE))
    with pytest.raises((ConnectionError, OSError)):  # reconnect attempt fails fast too
        remote.do_tmem_op(abi.gen_record(abi.TMEM_PUT_PAGE, 0, 1, 1), bytearray(PAGE))
    assert time.monotonic() - started < 2.0
    remote.close()


def test_sigterm_is_a_clean_shutdown_and_removes_the_unix_socket(tmp_path: Path):
    socket_path = tmp_path / "tmemd.sock"
    running = start_tmemd(tmp_path, listen=f"unix:{socket_path}")
    try:
        assert running.address == f"unix:{socket_path}"
        with RemoteTmem(running.address, 1) as remote:
            assert new_pool(remote) == 0
            assert running.stop() == 0
        assert not socket_path.exists()
        assert not (tmp_path / "ready").exists()  # a stale address would send the next caller to a dead server
        assert "shutting down" in running.log.read_text()
    finally:
        running.process.kill()
        running.process.wait(timeout=10)


def test_garbage_does_not_kill_the_server(daemon: Daemon):
    import socket

    host, port = daemon.address.removeprefix("tcp:").rsplit(":", 1)
    for junk in (b"\xff\xff\xff\xff", b"\x05\x00\x00\x00hello", b"GET / HTTP/1.0\r\n\r\n"):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            try:
                sock.sendall(junk)
                sock.shutdown(socket.SHUT_WR)
                assert sock.recv(64) == b""  # closed by the server...
            except (ConnectionResetError, BrokenPipeError, OSError) as exc:
                # ...or reset, or already gone when we shut our side down: it may close on the first
                # bad header before the rest of our junk arrives (any other error is a failure)
                assert isinstance(exc, (ConnectionResetError, BrokenPipeError)) or exc.errno == errno.ENOTCONN, exc
    with RemoteTmem(daemon.address, 1) as remote:
        assert new_pool(remote) == 0
    assert daemon.process.poll() is None
    assert "malformed frame" in daemon.log.read_text()


def test_v0_guest_on_an_accept_v0_daemon(tmp_path: Path):
    running = start_tmemd(tmp_path, "--accept-v0")
    try:
        with RemoteTmem(running.address, 5) as remote:
            assert new_pool(remote, persistent=True, version=0) == 0
            assert remote.do_tmem_op(abi.gen_record(abi.TMEM_PUT_PAGE, 0, 7, 1, version=0), bytearray(PAGE)) == 1
            page = bytearray(abi.PAGE_SIZE)
            assert remote.do_tmem_op(abi.gen_record(abi.TMEM_GET_PAGE, 0, 7, 1, version=0), page) == 1
            assert page == PAGE
    finally:
        running.process.kill()
        running.process.wait(timeout=10)


def test_bad_arguments_exit_cleanly():
    result = subprocess.run(
        [sys.executable, "-m", "tmemcore.server", "--listen", "tcp:nowhere", "--memory", "1M"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2 and "bad address" in result.stderr and "Traceback" not in result.stderr


# ------------------------------------------------------------------ tmemctl against tmemd


def test_tmemctl_list_freeze_thaw_save(daemon: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    with RemoteTmem(daemon.address, 7) as guest:
        assert new_pool(guest, persistent=True) == 0
        assert guest.do_tmem_op(abi.gen_record(abi.TMEM_PUT_PAGE, 0, 1 << 70, 2), bytearray(PAGE)) == 1
        server = ["--server", daemon.address]
        assert tmemctl([*server, "freeze", "7"]) == 0
        assert guest.do_tmem_op(abi.gen_record(abi.TMEM_PUT_PAGE, 0, 5, 5), bytearray(PAGE)) == -1000  # EFROZEN
        assert tmemctl([*server, "list", "--long"]) == 0
        out = capsys.readouterr().out
        assert "C=CI:7" in out and "fr:1" in out and "P=CI:7,PI:0,PT:PP" in out
        assert tmemctl([*server, "thaw", "7"]) == 0
        stream = tmp_path / "client7.tmem"
        assert tmemctl([*server, "save", "7", str(stream)]) == 0
        image = decode_stream(stream.read_bytes())
        assert image.pools[0].pages == [(1 << 70, 2, PAGE)]
        host = Tmem(memory_pages=4)
        restore_client(host, 7, io.BytesIO(stream.read_bytes()))
        assert host.client(7).handle(0).get(1 << 70, 2) == PAGE
        assert tmemctl([*server, "freeze", "999"]) == 1  # no such client
        assert "failed" in capsys.readouterr().err


def test_tmemctl_reports_an_unreachable_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert tmemctl(["--server", f"unix:{tmp_path}/none.sock", "list"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tmemctl: ") and err.count("\n") == 1


def test_sigint_stops_the_daemon_cleanly(tmp_path: Path):
    running = start_tmemd(tmp_path)
    try:
        running.process.send_signal(signal.SIGINT)
        assert running.process.wait(timeout=10) == 0
        assert "shutting down" in running.log.read_text() and "Traceback" not in running.log.read_text()
        assert running.process.stdout is not None
        assert running.process.stdout.read().strip() == f"tmemd listening on {running.address}"
    finally:
        running.process.kill()
        running.process.wait(timeout=10)


@pytest.mark.parametrize("flags", [["--spec", "v0"], ["--dedup", "--tze"], ["--compress-default"]])
def test_host_options_reach_the_host(tmp_path: Path, flags: list[str], capsys: pytest.CaptureFixture[str]):
    running = start_tmemd(tmp_path, *flags)
    try:
        version = abi.SPEC_V0 if "v0" in flags else abi.SPEC_V1
        with RemoteTmem(running.address, 1) as remote:  # open until saved: its pools die with the connection
            assert new_pool(remote, version=abi.SPEC_V1 - version) == -1  # the other version: EPERM
            assert new_pool(remote, version=version) == 0
            for index in range(3):
                record = abi.gen_record(abi.TMEM_PUT_PAGE, 0, 1, index, version=version)
                assert remote.do_tmem_op(record, bytearray(PAGE)) == 1
            assert tmemctl(["--server", running.address, "list", "--long"]) == 0
            out = capsys.readouterr().out
            if "--dedup" in flags:
                assert ",Gd:2," in out  # two of the three identical pages were deduplicated
            if "--compress-default" in flags:
                assert "co:1" in out
            stream = tmp_path / "saved.tmem"
            assert tmemctl(["--server", running.address, "save", "1", str(stream)]) == 0
            assert decode_stream(stream.read_bytes()).version == version  # v0 host: 40-byte control records
    finally:
        running.process.kill()
        running.process.wait(timeout=10)


@pytest.mark.parametrize("flags, message", [
    (["--tze"], "--tze needs --dedup"),
    (["--compress-default", "--dedup"], "--compress-default and --dedup exclude each other"),
    (["--spec", "v0", "--accept-v0"], "--accept-v0 is for a v1 host"),
    (["--memory", "2T"], "larger than the 1 TiB limit"),
    (["--memory", "0"], "--memory must be at least 1 byte (rounded up to whole 4096-byte pages), got '0'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--ready-file", "/nonexistent-dir/ready"], "--ready-file /nonexistent-dir/ready: /nonexistent-dir is not a writable directory"),
])
def test_contradictory_or_bad_flags_are_one_line_usage_errors(tmp_path: Path, flags: list[str], message: str):
    result = subprocess.run(
        [sys.executable, "-m", "tmemcore.server", "--listen", f"unix:{tmp_path}/t.sock", *flags],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2 and result.stderr.startswith("tmemd: ") and message in result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "t.sock").exists()


def test_listen_failure_names_the_address(tmp_path: Path):
    address = f"unix:{tmp_path}/missing-dir/tmemd.sock"
    result = subprocess.run([sys.executable, "-m", "tmemcore.server", "--listen", address],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr == f"tmemd: cannot listen on {address}: No such file or directory\n"


def test_tmemctl_unreachable_server_names_the_address(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    address = f"unix:{tmp_path}/none.sock"
    assert tmemctl(["--server", address, "list"]) == 1
    assert capsys.readouterr().err == f"tmemctl: cannot reach tmemd at {address}: No such file or directory\n"


@pytest.mark.parametrize("command, options", [
    (["tmemcore.server"], ["--memory", "--accept-v0", "--spec", "--dedup", "--tze", "--compress-default",
                           "--ready-file", "--log-level", "--socket-mode", "--group", "--tls-cert", "--tls-key",
                           "--tls-ca", "--tls-control-subject", "--insecure-tcp", "--shared-auth",
                           "--max-connections", "--max-per-principal", "--max-control"]),
    (["tmemcore.cli"], ["--server", "--timeout"]),
    (["tmemcore.cli", "list"], ["--long"]),
    (["tmemcore.cli", "save"], ["--live"]),
    (["tmemcore.cli", "stream", "inspect"], ["--json"]),
])
def test_help_shows_every_default(command: list[str], options: list[str]):
    result = subprocess.run([sys.executable, "-m", *command, "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    paragraphs = {}
    for block in re.split(r"\n  (?=-)", result.stdout.split("options:", 1)[1]):
        if block.strip():
            paragraphs[block.split()[0].rstrip(",")] = " ".join(block.split())
    for option in options:
        assert "(default: " in paragraphs[option] or "default: " in paragraphs[option], paragraphs[option]


GUEST = """
import sys, time
from tmemcore import abi
from tmemcore.wire import CLIENT_ANY, RemoteTmem
remote = RemoteTmem(sys.argv[1], CLIENT_ANY)
cid = remote.connect()
flags = abi.pool_flags(persistent=False)
assert remote.do_tmem_op(abi.new_pool_record(flags)) == 0
assert remote.do_tmem_op(abi.gen_record(abi.TMEM_PUT_PAGE, 0, 5, 1), bytearray(4096)) == 1
print(cid, flush=True)
time.sleep(600)
"""


def test_sigkilled_guest_loses_its_pools_and_its_id(daemon: Daemon, capsys: pytest.CaptureFixture[str]):
    guests = [subprocess.Popen([sys.executable, "-c", GUEST, daemon.address], stdout=subprocess.PIPE, text=True)
              for _ in range(2)]
    try:
        ids = sorted(int(guest.stdout.readline()) for guest in guests)  # type: ignore[union-attr]
        assert ids == [1, 2]  # assigned by the server: distinct
        assert tmemctl(["--server", daemon.address, "list"]) == 0
        before = capsys.readouterr().out
        assert "P=CI:1,PI:0" in before and "P=CI:2,PI:0" in before
        victim = guests[0]
        victim.kill()
        victim.wait(timeout=10)
        deadline = time.monotonic() + 10
        while True:  # poll until the server noticed the dead connection
            assert tmemctl(["--server", daemon.address, "list"]) == 0
            listing = capsys.readouterr().out
            if listing.count("P=CI:") == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert listing.count("P=CI:") == 1, listing  # the survivor keeps its pool, the dead guest's is gone
        assert "pool(s) [0] of the closed connection" in daemon.log.read_text()
    finally:
        for guest in guests:
            guest.kill()
            guest.wait(timeout=10)


def test_memory_is_rounded_up_to_pages_like_guestfs(tmp_path: Path):
    from tmemcore.server import build_host, build_parser

    for text, pages in (("1", 1), ("4097", 2), ("8K", 2)):
        args = build_parser().parse_args(["--listen", f"unix:{tmp_path}/t.sock", "--memory", text])
        assert build_host(args).memory_pages == pages, text
