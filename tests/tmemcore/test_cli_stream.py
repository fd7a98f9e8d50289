"""tmemctl stream inspect / convert, and its error contract (one line, exit 1 or 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tmemcore import abi
from tmemcore.cli import main
from tmemcore.oid import Oid
from tmemcore.savestream import ClientImage, PoolImage, decode_stream, encode_stream

PAGE = bytes(range(256)) * 16


def image(version: int = abi.SPEC_V1, wide: bool = False) -> ClientImage:
    oid = Oid.from_words(1, 2, 3) if wide else Oid(77)
    return ClientImage(
        version=version,
        flags=abi.TMEM_CLIENT_FROZEN,
        weight=5,
        cap=1,
        pools=[
            PoolImage(0, abi.pool_flags(version=version, shared=True), 0, (0x1111, 0x2222)),
            PoolImage(3, abi.pool_flags(persistent=True, version=version), 2, (0, 0), [(oid, 4, PAGE)]),
        ],
        invalidated=[(3, Oid(8), 1)],
    )


@pytest.fixture
def v1_file(tmp_path: Path) -> Path:
    path = tmp_path / "client.tmem"
    path.write_bytes(encode_stream(image()))
    return path


def test_inspect_text(v1_file: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["stream", "inspect", str(v1_file)]) == 0
    out = capsys.readouterr().out
    assert "stream version v1" in out and "frozen" in out and "weight 5, cap 1" in out
    assert "pool 0: ephemeral/shared" in out and "uuid 0000000000001111:0000000000002222" in out
    assert "pool 3: persistent/private" in out and "n_pages 2, records 1, terminator yes" in out
    assert "extra section: 1 record(s)" in out and "pool 3 oid (0x8, 0x0, 0x0) index 1" in out


def test_inspect_json(v1_file: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["stream", "inspect", "--json", str(v1_file)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bytes"] == v1_file.stat().st_size
    assert info["client"] == {"flags": 2, "compress": False, "frozen": True, "weight": 5, "cap": 1}
    assert [(p["pool_id"], p["records"], p["terminator"]) for p in info["pools"]] == [(0, 0, False), (3, 1, True)]
    assert info["extra_section"] == [{"pool_id": 3, "oid": ["0x8", "0x0", "0x0"], "index": 1}]


def test_convert_both_ways(v1_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    v0_file = tmp_path / "v0.tmem"
    back_file = tmp_path / "back.tmem"
    assert main(["stream", "convert", "--to", "v0", str(v1_file), str(v0_file)]) == 0
    assert decode_stream(v0_file.read_bytes()) == image(abi.SPEC_V0)
    assert main(["stream", "convert", "--to", "v1", str(v0_file), str(back_file)]) == 0
    assert back_file.read_bytes() == v1_file.read_bytes()
    assert "v0 -> v1" in capsys.readouterr().out


def test_convert_of_a_wide_oid_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    wide = tmp_path / "wide.tmem"
    wide.write_bytes(encode_stream(image(wide=True)))
    out = tmp_path / "out.tmem"
    assert main(["stream", "convert", "--to", "v0", str(wide), str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tmemctl: cannot convert to v0: pool 3 page oid Oid(0x1, 0x2, 0x3) index 4")
    assert err.count("\n") == 1 and not out.exists()
    assert list(tmp_path.iterdir()) == [wide]  # no temporary left behind


def test_truncated_stream_is_a_data_error(v1_file: Path, capsys: pytest.CaptureFixture[str]):
    v1_file.write_bytes(v1_file.read_bytes()[:50])
    assert main(["stream", "inspect", str(v1_file)]) == 1
    err = capsys.readouterr().err
    assert "truncated stream at offset 36: pool 0's header" in err and err.count("\n") == 1


@pytest.mark.parametrize("where", ["missing-dir", "directory"])
def test_convert_to_an_unwritable_path_names_that_path(v1_file: Path, tmp_path: Path, where: str,
                                                      capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "missing" / "out.tmem" if where == "missing-dir" else tmp_path
    assert main(["stream", "convert", "--to", "v0", str(v1_file), str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"tmemctl: {out}: ") and ".tmp" not in err and err.count("\n") == 1


def test_missing_file_is_a_data_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["stream", "inspect", str(tmp_path / "nope")]) == 1
    assert "No such file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [[], ["stream"], ["stream", "convert", "--to", "v2", "a", "b"], ["list"], ["--server", "bogus", "list"],
     ["frobnicate"], ["--server", "unix:/x", "freeze", "-1"], ["--server", "unix:/x", "save", "65535", "f"],
     ["--server", "unix:/x", "thaw", "x"]],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() and "Traceback" not in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]):
    assert main(["--help"]) == 0
    assert "stream" in capsys.readouterr().out


def test_console_entry_point_runs_without_traceback(tmp_path: Path):
    bad = tmp_path / "bad.tmem"
    bad.write_bytes(b"\x00" * 10)
    result = subprocess.run(
        [sys.executable, "-m", "tmemcore.cli", "stream", "inspect", str(bad)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("tmemctl: bad stream at offset 0: marker is 0")
    assert "Traceback" not in result.stderr


def test_a_stream_can_come_from_a_pipe(v1_file: Path):
    """`cat s.tmem | tmemctl stream inspect /dev/stdin` was "Illegal seek" (the size came from tell())."""
    result = subprocess.run(
        [sys.executable, "-m", "tmemcore.cli", "stream", "inspect", "--json", "/dev/stdin"],
        input=v1_file.read_bytes(), capture_output=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["bytes"] == v1_file.stat().st_size


@pytest.mark.parametrize("value", ["1e10", "1e308", "0", "nan"])
def test_timeouts_out_of_range_are_usage_errors(value: str, capsys: pytest.CaptureFixture[str]):
    assert main(["--server", "tcp:127.0.0.1:9", "--timeout", value, "list"]) == 2  # 1e10: OverflowError traceback
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--timeout" in err
