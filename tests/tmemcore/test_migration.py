"""Migration between two real tmemd processes: tmemctl save on one, tmemctl restore on the other."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tmemcore.test_server_daemon import Daemon, start_tmemd
from tmemcore import abi, seal
from tmemcore.savestream import decode_stream
from tmemcore.wire import RemoteTmem

pytestmark = pytest.mark.timeout(90)
PAGES = 40


def tmemctl(*argv: str) -> subprocess.CompletedProcess[str]:
    """The real entry point, as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "tmemcore.cli", *argv], capture_output=True, text=True, timeout=60)


def daemon_in(tmp_path: Path, name: str, *args: str) -> Daemon:
    where = tmp_path / name
    where.mkdir()
    return start_tmemd(where, *args, listen=f"unix:{where}/tmemd.sock")


@pytest.fixture
def two_daemons(tmp_path: Path) -> Iterator[tuple[Daemon, Daemon]]:
    source, target = daemon_in(tmp_path, "a"), daemon_in(tmp_path, "b")
    try:
        yield source, target
    finally:
        for running in (source, target):
            running.process.kill()
            running.process.wait(timeout=10)


def fill(remote: RemoteTmem, version: int = abi.SPEC_V1) -> dict[tuple[int, int], bytes]:
    """An ephemeral pool 0 and a persistent pool 1 of PAGES random pages; the persistent ones."""
    assert remote.do_tmem_op(abi.new_pool_record(abi.pool_flags(version=version), version=version)) == 0
    flags = abi.pool_flags(persistent=True, version=version)
    assert remote.do_tmem_op(abi.new_pool_record(flags, version=version)) == 1
    pages = {}
    for index in range(PAGES):
        oid = (index * 7919) | ((1 << 100) if version == abi.SPEC_V1 and index % 3 == 0 else 0)
        data = os.urandom(abi.PAGE_SIZE)
        for pool in (0, 1):
            assert remote.do_tmem_op(abi.gen_record(abi.TMEM_PUT_PAGE, pool, oid, index, version), bytearray(data)) == 1
        pages[(oid, index)] = data
    return pages


def persistent_pages(address: str, client: int, handles: list[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
    """What client ``client`` of the tmemd at ``address`` gets back for each handle of pool 1."""
    found = {}
    with RemoteTmem(address, client) as remote:
        for oid, index in handles:
            page = bytearray(abi.PAGE_SIZE)
            assert remote.do_tmem_op(abi.gen_record(abi.TMEM_GET_PAGE, 1, oid, index), page) == 1, (oid, index)
            found[(oid, index)] = bytes(page)
    return found


def client_lines(address: str) -> list[str]:
    """The C=/P= lines of LIST: what a refused restore must leave as it was (G= counts ops)."""
    listed = tmemctl("--server", address, "list", "--long")
    assert listed.returncode == 0, listed.stderr
    return [line for line in listed.stdout.splitlines() if not line.startswith("G=")]


def test_sealed_live_migration_keeps_every_persistent_byte(two_daemons: tuple[Daemon, Daemon], tmp_path: Path):
    source, target = two_daemons
    key, stream = tmp_path / "seal.key", tmp_path / "client7.tmem"
    assert tmemctl("keygen", str(key)).returncode == 0
    with RemoteTmem(source.address, 7) as guest:  # the guest stays connected: its pools live on
        pages = fill(guest)
        saved = tmemctl("--server", source.address, "save", "7", str(stream), "--live", "--seal", str(key))
        assert saved.returncode == 0, saved.stderr
        assert "sealed (HMAC-SHA256" in saved.stdout
        assert "fr:0" in "".join(client_lines(source.address))  # the live save left the source thawed
        restored = tmemctl("--server", target.address, "restore", "7", str(stream), "--verify", str(key))
        assert restored.returncode == 0, restored.stderr
        assert f"client 7 restored from {stream}: v1 stream, 2 pool(s), {PAGES} persistent page(s), seal verified" \
            in restored.stdout
        assert persistent_pages(target.address, 7, list(pages)) == pages
        assert persistent_pages(source.address, 7, list(pages)) == pages
    again = tmp_path / "again.tmem"  # the target's client saves to the same pages, in the same order
    assert tmemctl("--server", target.address, "save", "7", str(again), "--live").returncode == 0
    original = decode_stream(seal.unseal(stream.read_bytes(), seal.load_key(key)))
    assert decode_stream(again.read_bytes()).pools == original.pools
    assert [(int(o), i) for o, i, _ in original.pools[1].pages] == list(pages)


def test_a_v0_stream_needs_convert_on_a_v1_daemon(tmp_path: Path):
    source, target = daemon_in(tmp_path, "a", "--spec", "v0"), daemon_in(tmp_path, "b")
    try:
        stream = tmp_path / "client7.v0.tmem"
        with RemoteTmem(source.address, 7) as guest:
            pages = fill(guest, abi.SPEC_V0)
            assert tmemctl("--server", source.address, "save", "7", str(stream)).returncode == 0
        assert decode_stream(stream.read_bytes()).version == abi.SPEC_V0
        before = client_lines(target.address)
        refused = tmemctl("--server", target.address, "restore", "7", str(stream))
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1
        assert "stream is v0 but this host accepts only v1 for client 7" in refused.stderr
        assert "--convert" in refused.stderr
        assert client_lines(target.address) == before  # nothing restored, nothing half-made
        converted = tmemctl("--server", target.address, "restore", "7", str(stream), "--convert")
        assert converted.returncode == 0, converted.stderr
        assert persistent_pages(target.address, 7, list(pages)) == pages  # v0 oid n is v1 oid (n, 0, 0)
        again = tmemctl("--server", target.address, "restore", "7", str(stream), "--convert")
        assert again.returncode == 1 and "already exists" in again.stderr
    finally:
        for running in (source, target):
            running.process.kill()
            running.process.wait(timeout=10)
