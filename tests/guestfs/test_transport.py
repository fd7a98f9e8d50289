"""Transports: in-process host, tmemd over a socket (and a server that dies), null, mock."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tmemcore import abi

from guestfs.cleancache import CleanCache
from guestfs.filekey import FileKey, key_for_fd
from guestfs.pageio import PageIO
from guestfs.transport import InProcessTransport, MockTransport, NullTransport, SocketTransport

PAGE = abi.PAGE_SIZE
KEY = FileKey(oid=0xABC | 5 << 64, source="synthetic", ino=0xABC)


def real_tmem(**kwargs: object) -> object:
    import tmemcore

    if not hasattr(tmemcore, "Tmem"):
        pytest.skip("tmemcore.Tmem has not landed yet")
    return tmemcore.Tmem(**kwargs)


def test_null_transport_answers_enodev() -> None:
    t = NullTransport()
    assert t.call(abi.new_pool_record(abi.pool_flags())) == -errno.ENODEV
    assert t.calls == 1
    t.close()


def test_mock_transport_models_exclusive_gets() -> None:
    t = MockTransport()
    pool = t.call(abi.new_pool_record(abi.pool_flags()))
    assert pool == 0
    t.call(abi.gen_record(abi.TMEM_PUT_PAGE, pool, 7, 1), bytearray(b"z" * PAGE))
    buf = bytearray(PAGE)
    assert t.call(abi.gen_record(abi.TMEM_GET_PAGE, pool, 7, 1), buf) == 1 and buf == b"z" * PAGE
    assert t.call(abi.gen_record(abi.TMEM_GET_PAGE, pool, 7, 1), buf) == 0
    assert t.call(abi.new_pool_record(abi.pool_flags(version=0), version=0)) == -errno.EPERM


def test_in_process_transport_against_the_real_host() -> None:
    tmem = real_tmem(memory_pages=16)
    cc = CleanCache(InProcessTransport(tmem, client_id=3))  # type: ignore[arg-type]
    cc.init_fs()
    assert cc.mode == "v1"
    cc.put_page(KEY, 0, b"a" * PAGE)
    cc.put_page(KEY, 1, b"b" * 100)
    assert cc.get_page(KEY, 1) == b"b" * 100 + bytes(PAGE - 100)
    assert cc.get_page(KEY, 0) == b"a" * PAGE
    assert cc.get_page(KEY, 0) is None  # private ephemeral: exclusive
    cc.check()
    tmem.check()  # type: ignore[attr-defined]
    cc.invalidate_fs()
    tmem.check()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("spec", "accept_v0", "mode"),
    [(1, False, "v1"), (0, False, "v0-xxh64"), (1, True, "v1")],
)
def test_auto_abi_against_real_hosts(spec: int, accept_v0: bool, mode: str) -> None:
    tmem = real_tmem(memory_pages=16, accept_v0=accept_v0, spec_version=spec)
    cc = CleanCache(InProcessTransport(tmem), abi="auto")  # type: ignore[arg-type]
    cc.init_fs()
    assert cc.mode == mode
    cc.put_page(KEY, 0, b"q" * PAGE)
    assert cc.get_page(KEY, 0) == b"q" * PAGE


def test_v1_guest_on_v0_host_is_passthrough() -> None:
    tmem = real_tmem(memory_pages=16, spec_version=0)
    cc = CleanCache(InProcessTransport(tmem), abi="v1")  # type: ignore[arg-type]
    cc.init_fs()
    assert cc.mode == "passthrough" and str(-errno.EPERM) in cc.disabled_reason


class Tmemd:
    """A real tmemd subprocess on a free loopback port."""

    def __init__(self, workdir: Path, *extra: str) -> None:
        ready = workdir / "ready"
        self.log = open(workdir / "tmemd.log", "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tmemcore.server", "--listen", "tcp:127.0.0.1:0", "--insecure-tcp", "--ready-file",
             str(ready), *extra],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 15
        while not (ready.exists() and ready.read_text().strip()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (workdir / "tmemd.log").read_text(errors="replace").strip().splitlines()
                pytest.skip(f"tmemd did not start: {tail[-1] if tail else 'no output'}")
            time.sleep(0.02)  # polling the ready file with a deadline, not synchronising by sleep
        self.address = ready.read_text().strip()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self.log.close()


@pytest.fixture
def tmemd(tmp_path: Path) -> Iterator[Tmemd]:
    server = Tmemd(tmp_path)
    yield server
    server.stop()


@pytest.mark.timeout(60)
def test_socket_transport_roundtrip(tmemd: Tmemd) -> None:
    t = SocketTransport(tmemd.address, client_id=2, timeout=2.0)
    cc = CleanCache(t)
    cc.init_fs()
    assert cc.mode == "v1"
    cc.put_page(KEY, 4, b"s" * PAGE)
    assert cc.get_page(KEY, 4) == b"s" * PAGE
    assert cc.get_page(KEY, 4) is None
    cc.invalidate_fs()
    t.close()


@pytest.mark.timeout(60)
def test_dead_server_makes_misses_never_failed_reads(tmemd: Tmemd, tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = os.urandom(8 * PAGE)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    t = SocketTransport(tmemd.address, timeout=1.0)
    cc = CleanCache(t)
    cc.init_fs()
    pio = PageIO(2, cc)
    key = key_for_fd(fd)
    try:
        assert pio.read(key, fd, 0, len(data)) == data
        assert pio.read(key, fd, 0, len(data)) == data
        assert pio.stats()["succ_gets"] > 0
        tmemd.stop()
        for _ in range(3):
            assert pio.read(key, fd, 0, len(data)) == data
        s = pio.stats()
        assert s["transport_errors"] == 1 and s["mode"] == "passthrough" and t.errors == 1
        pio.check()
    finally:
        os.close(fd)
        pio.close()
        t.close()


@pytest.mark.timeout(60)
def test_auto_abi_falls_back_to_v0_on_a_v0_tmemd(tmp_path: Path) -> None:
    server = Tmemd(tmp_path, "--spec", "v0")
    try:
        t = SocketTransport(server.address, timeout=2.0)
        cc = CleanCache(t, abi="auto", fold="ino")
        cc.init_fs()
        assert cc.mode == "v0-ino"
        cc.put_page(KEY, 1, b"v" * PAGE)
        assert cc.get_page(KEY, 1) == b"v" * PAGE
        cc.invalidate_fs()
        t.close()
    finally:
        server.stop()
