"""tmemctl's control commands against a real TmemServer on a unix socket (in-process, real Tmem host)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.tmemcore.test_fuzz import snapshot
from tmemcore import abi, seal
from tmemcore.cli import main as tmemctl
from tmemcore.savestream import decode_stream, encode_stream, convert
from tmemcore.server import TmemServer
from tmemcore.stats import host_stats
from tmemcore.tmem import Tmem
from tmemcore.wire import RemoteTmem

pytestmark = pytest.mark.timeout(60)
UUID = "01234567-89ab-cdef-0123-456789abcdef"
UUID_PAIR = (0x0123456789ABCDEF, 0x0123456789ABCDEF)


@dataclass
class Served:
    host: Tmem
    address: str

    def run(self, *argv: str) -> int:
        return tmemctl(["--server", self.address, *argv])


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    host = Tmem(memory_pages=64)
    server = TmemServer(host, f"unix:{tmp_path}/tmemd.sock")
    address = server.start()
    try:
        yield Served(host, address)
    finally:
        server.stop()


@pytest.fixture
def guest(served: Served) -> Iterator[RemoteTmem]:
    """Client 7 with an ephemeral pool 0 and a persistent pool 1 holding three distinct pages."""
    with RemoteTmem(served.address, 7) as remote:
        assert remote.do_tmem_op(abi.new_pool_record(abi.pool_flags())) == 0
        assert remote.do_tmem_op(abi.new_pool_record(abi.pool_flags(persistent=True))) == 1
        for index in range(3):
            page = bytearray(os.urandom(abi.PAGE_SIZE))
            assert remote.do_tmem_op(abi.gen_record(abi.TMEM_PUT_PAGE, 1, 1 << 70 | index, index), page) == 1
            assert remote.do_tmem_op(abi.gen_record(abi.TMEM_PUT_PAGE, 0, 5, index), page) == 1
        yield remote


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("tmemctl: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_setters_reach_the_client(served: Served, guest: RemoteTmem, capsys: pytest.CaptureFixture[str]):
    client = served.host.clients[7]
    assert served.run("set-weight", "7", "5") == 0 and client.weight == 5
    assert served.run("set-cap", "7", "9") == 0 and client.cap == 9
    assert served.run("set-compress", "7", "on") == 0 and client.compress
    assert served.run("set-compress", "all", "off") == 0 and not client.compress
    assert served.run("freeze", "all") == 0 and client.frozen
    assert served.run("thaw", "7") == 0 and not client.frozen
    assert "client 7: weight 5" in capsys.readouterr().out
    assert served.run("set-weight", "8", "1") == 1  # no such client
    assert "failed: -1 (no such client" in one_line_error(capsys)
    served.host.check()


def test_flush_gives_back_ephemeral_pages(served: Served, guest: RemoteTmem, capsys: pytest.CaptureFixture[str]):
    assert served.host.eviction.global_eph_count == 3
    assert served.run("flush", "5") == 0  # 5 KiB rounds up to two pages
    assert capsys.readouterr().out == "flushed 8 KiB of ephemeral pages (asked for 5 KiB)\n"
    assert served.host.eviction.global_eph_count == 1
    assert served.host.clients[7].pools[1].npages == 3  # persistent pages are never flushed
    served.host.check()


def test_auth_and_revoke(served: Served, guest: RemoteTmem, capsys: pytest.CaptureFixture[str]):
    client = served.host.clients[7]
    assert served.run("auth", "7", UUID) == 0 and UUID_PAIR in client.auth_uuids
    assert served.run("auth", "7", UUID, "--revoke") == 0 and UUID_PAIR not in client.auth_uuids
    assert served.run("auth", "7", UUID, "--revoke") == 0
    assert "nothing to revoke" in capsys.readouterr().out
    assert served.run("auth", "all") == 0 and served.host.global_shared_auth
    assert served.run("auth", "all", "--revoke") == 0 and not served.host.global_shared_auth
    assert served.run("auth", "8", UUID) == 1
    assert "no such client" in one_line_error(capsys)
    for argv in (["auth", "7"], ["auth", "all", UUID], ["auth", "7", "not-a-uuid"],
                 ["auth", "7", "ffffffff-ffff-ffff-ffff-ffffffffffff"]):
        assert served.run(*argv) == 2, argv
        one_line_error(capsys)


def test_list_json_is_the_stats_shape(served: Served, guest: RemoteTmem, capsys: pytest.CaptureFixture[str]):
    assert served.run("auth", "7", UUID) == 0
    capsys.readouterr()
    assert served.run("list", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    stats = host_stats(served.host)
    (client,) = listed["clients"]
    expected = {k: v for k, v in stats["clients"][0].items() if k in client}
    assert client == expected and [p["pool_id"] for p in client["pools"]] == [0, 1]
    assert client["pools"][1]["pgp_count"] == 3 and client["pools"][1]["type"] == "PP"
    assert listed["global"]["global_pgp_count"] == stats["global"]["global_pgp_count"] == 6


def test_save_seal_then_restore_verify_elsewhere(served: Served, guest: RemoteTmem, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]):
    key, stream = tmp_path / "seal.key", tmp_path / "client7.tmem"
    assert tmemctl(["keygen", str(key)]) == 0
    assert served.run("save", "7", str(stream), "--live", "--seal", str(key)) == 0
    assert seal.is_sealed(stream.read_bytes())
    image = decode_stream(seal.unseal(stream.read_bytes(), seal.load_key(key)))
    assert served.run("restore", "9", str(stream), "--verify", str(key)) == 0
    assert "client 9 restored" in capsys.readouterr().out
    pool = served.host.client(9).handle(1)
    for oid, index, data in image.pools[1].pages:
        assert pool.get(oid, index) == served.host.client(7).handle(1).get(oid, index) == data
    assert served.run("restore", "9", str(stream), "--verify", str(key)) == 1  # exists now
    assert "already exists" in one_line_error(capsys)
    served.host.check()


def test_every_damaged_sealed_stream_is_refused_and_changes_nothing(
        served: Served, guest: RemoteTmem, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """One byte of every part of a sealed stream, and truncations, through tmemctl restore."""
    key, stream = tmp_path / "seal.key", tmp_path / "client7.tmem"
    assert tmemctl(["keygen", str(key)]) == 0
    assert served.run("save", "7", str(stream), "--live", "--seal", str(key)) == 0
    sealed = stream.read_bytes()
    body = 28  # where the libxc stream starts
    page_at = body + 32 + 2 * 28 + 24 + 4  # marker and client header, two pool headers, an oid, an index
    first_page = decode_stream(seal.unseal(sealed, seal.load_key(key))).pools[1].pages[0]
    assert sealed[page_at : page_at + abi.PAGE_SIZE] == first_page[2]  # the positions below are where they say
    assert sealed[len(sealed) - 40 : len(sealed) - 32] == b"\xfa\xff\xff\xff\xff\xff\xff\xff"  # -6, empty extra
    positions = {"magic": 0, "format version": 8, "algorithm": 10, "key id": 12, "length": 20,
                 "stream marker": body, "client header": body + 8, "pool header": body + 36,
                 "oid": page_at - 28, "index": page_at - 4, "page data": page_at, "end of pools": len(sealed) - 44,
                 "extra section": len(sealed) - 40, "tag": len(sealed) - 1}
    before = snapshot(served.host)
    damaged = tmp_path / "damaged.tmem"
    cases = [(name, bytes(sealed[:at]) + bytes([sealed[at] ^ 0x01]) + sealed[at + 1 :]) for name, at in positions.items()]
    cases += [(f"cut to {n}", sealed[:n]) for n in (0, 7, 28, body + 100, len(sealed) - 32, len(sealed) - 1)]
    cases += [("appended", sealed + b"\0"), ("unsealed", sealed[body:-32])]
    for name, data in cases:
        damaged.write_bytes(data)
        assert served.run("restore", "9", str(damaged), "--verify", str(key)) == 1, name
        one_line_error(capsys)
        assert snapshot(served.host) == before, name
    assert 9 not in served.host.clients
    served.host.check()


def test_seal_and_verify_refusals(served: Served, guest: RemoteTmem, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]):
    key, other, stream = tmp_path / "seal.key", tmp_path / "other.key", tmp_path / "client7.tmem"
    assert tmemctl(["keygen", str(key)]) == 0 and tmemctl(["keygen", str(other)]) == 0
    assert served.run("save", "7", str(stream), "--seal", str(key)) == 0
    capsys.readouterr()
    assert served.run("restore", "9", str(stream)) == 1  # sealed: needs --verify
    assert "give --verify KEYFILE" in one_line_error(capsys)
    assert served.run("restore", "9", str(stream), "--verify", str(other)) == 1
    assert "another key" in one_line_error(capsys)
    key.chmod(0o644)
    assert served.run("restore", "9", str(stream), "--verify", str(key)) == 1
    assert "too open" in one_line_error(capsys)
    assert served.run("save", "7", str(tmp_path / "new.tmem"), "--seal", str(key)) == 1  # before any save
    assert "too open" in one_line_error(capsys) and not (tmp_path / "new.tmem").exists()
    assert not served.host.clients[7].frozen and 9 not in served.host.clients


def test_restore_of_an_unsealed_stream_and_convert(served: Served, guest: RemoteTmem, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]):
    stream, v0 = tmp_path / "client11.tmem", tmp_path / "client11.v0.tmem"
    with RemoteTmem(served.address, 11) as narrow:  # oids that fit v0's 64 bits
        assert narrow.do_tmem_op(abi.new_pool_record(abi.pool_flags(persistent=True))) == 0
        assert narrow.do_tmem_op(abi.gen_record(abi.TMEM_PUT_PAGE, 0, 5, 1), bytearray(b"v0" * 2048)) == 1
        assert served.run("save", "11", str(stream)) == 0
    v0.write_bytes(encode_stream(convert(decode_stream(stream.read_bytes()), abi.SPEC_V0)))
    capsys.readouterr()
    assert served.run("restore", "9", str(v0)) == 1
    assert "stream is v0 but this host accepts only v1" in one_line_error(capsys)
    assert 9 not in served.host.clients
    assert served.run("restore", "9", str(v0), "--convert") == 0
    assert served.host.clients[9].version == abi.SPEC_V1
    assert served.host.client(9).handle(0).get(5, 1) == b"v0" * 2048
    assert served.run("restore", "10", str(stream), "--verify", str(tmp_path / "none.key")) == 1
    assert "cannot read the key" in one_line_error(capsys)
    served.host.check()


def test_stream_seal_unseal_verify_inspect(tmp_path: Path, served: Served, guest: RemoteTmem,
                                           capsys: pytest.CaptureFixture[str]):
    key, plain = tmp_path / "seal.key", tmp_path / "plain.tmem"
    sealed, back = tmp_path / "sealed.tmem", tmp_path / "back.tmem"
    assert tmemctl(["keygen", str(key)]) == 0
    assert served.run("save", "7", str(plain)) == 0
    assert tmemctl(["stream", "seal", "--key", str(key), str(plain), str(sealed)]) == 0
    assert tmemctl(["stream", "verify", "--key", str(key), str(sealed)]) == 0
    assert "seal ok, v1 stream" in capsys.readouterr().out
    assert tmemctl(["stream", "unseal", "--key", str(key), str(sealed), str(back)]) == 0
    assert back.read_bytes() == plain.read_bytes()
    capsys.readouterr()
    assert tmemctl(["stream", "inspect", "--json", "--verify", str(key), str(sealed)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["seal"]["verified"] and info["seal"]["algorithm"] == "HMAC-SHA256"
    assert info["bytes"] == plain.stat().st_size
    assert tmemctl(["stream", "inspect", str(sealed)]) == 0
    assert "NOT verified" in capsys.readouterr().out
    for argv in (["stream", "verify", "--key", str(key), str(plain)],  # not sealed
                 ["stream", "seal", "--key", str(key), str(sealed), str(tmp_path / "x")],  # sealed already
                 ["stream", "convert", "--to", "v0", str(sealed), str(tmp_path / "x")]):
        assert tmemctl(argv) == 1, argv
        one_line_error(capsys)
    (tmp_path / "junk").write_bytes(b"\xfb\xff\xff\xffjunk")
    assert tmemctl(["stream", "seal", "--key", str(key), str(tmp_path / "junk"), str(tmp_path / "x")]) == 1
    assert "truncated stream" in one_line_error(capsys) and not (tmp_path / "x").exists()


def test_keygen_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    key = tmp_path / "seal.key"
    assert tmemctl(["keygen", str(key)]) == 0
    text = key.read_text()
    assert tmemctl(["keygen", str(key)]) == 1 and key.read_text() == text
    assert "not overwriting" in one_line_error(capsys)
    assert tmemctl(["keygen", str(tmp_path / "missing" / "k")]) == 1
    one_line_error(capsys)


@pytest.mark.parametrize("argv", [
    ["set-weight", "7"], ["set-weight", "7", "-1"], ["set-cap", "x", "1"], ["set-compress", "7", "yes"],
    ["flush", "4294967296"], ["flush"], ["restore", "7"], ["freeze", "65535"],
])
def test_usage_errors_exit_2(served: Served, argv: list[str], capsys: pytest.CaptureFixture[str]):
    assert served.run(*argv) == 2
    one_line_error(capsys)


def test_server_commands_need_a_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert tmemctl(["flush", "4"]) == 2
    assert "needs --server" in one_line_error(capsys)


@pytest.mark.parametrize("command, options", [
    (["list"], ["--long", "--json"]),
    (["save"], ["--live", "--seal"]),
    (["restore"], ["--convert", "--verify"]),
    (["auth"], ["--revoke"]),
    (["stream", "inspect"], ["--json", "--verify"]),
    (["stream", "seal"], ["--key"]),
    (["stream", "verify"], ["--key"]),
])
def test_help_shows_every_default(command: list[str], options: list[str]):
    result = subprocess.run([sys.executable, "-m", "tmemcore.cli", *command, "--help"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    paragraphs = {}
    for block in re.split(r"\n  (?=-)", result.stdout.split("options:", 1)[1]):
        if block.strip():
            paragraphs[block.split()[0].rstrip(",")] = " ".join(block.split())
    for option in options:
        assert "default: " in paragraphs[option] or "(required)" in paragraphs[option], paragraphs[option]
