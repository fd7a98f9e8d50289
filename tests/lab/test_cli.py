"""guestfs lab CLI: help everywhere, one-line errors, JSON output, experiments writing files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from guestfs.lab.cli import build_parser, main, parse_pages


def lirs_file(tmp_path: Path, keys: list[int]) -> Path:
    path = tmp_path / "small.trace"
    path.write_text("\n".join(map(str, keys)) + "\n")
    return path


@pytest.mark.parametrize("command", ["simulate", "mrc", "hitrate", "keying", "live"])
def test_help_everywhere_shows_defaults(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "default" in capsys.readouterr().out


def test_parse_pages_units() -> None:
    assert parse_pages("1000") == 1000
    assert parse_pages("64M") == 16384
    assert parse_pages("4k") == 1
    assert parse_pages("5K") == 2  # bytes round up to whole pages


def test_bad_size_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["simulate", "--trace", "x", "--tmem", "lots"])
    assert info.value.code == 2
    assert "invalid size" in capsys.readouterr().err


def test_malformed_trace_exit_1_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.trace"
    path.write_text("1\n2\nthree\n")
    assert main(["simulate", "--trace", str(path), "--engine", "fast"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "broken.trace: line 3" in err and "Traceback" not in err


def test_simulate_fast_json_with_opt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = lirs_file(tmp_path, [1, 2, 3, 1, 2, 4, 1, 5, 2, 3])
    code = main(["--quiet", "simulate", "--trace", str(path), "--page-cache", "1", "--tmem", "0", "--tmem", "2",
                 "--engine", "fast", "--opt", "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["tmem_pages"] for r in rows] == [0, 2]
    assert rows[0]["tmem_hits"] == 0 and rows[1]["hits"] >= rows[0]["hits"]
    assert all(r["belady_hits"] >= r["hits"] for r in rows)


def test_simulate_model_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = lirs_file(tmp_path, [1, 2, 1, 3, 1, 2] * 20)
    assert main(["simulate", "--trace", str(path), "--page-cache", "1", "--tmem", "2", "--engine", "model"]) == 0
    out = capsys.readouterr().out
    assert "page cache" in out and "model" not in out.splitlines()[1]


def test_mrc_writes_csv_json_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = lirs_file(tmp_path, [1, 2, 3, 1, 2, 3, 4, 4, 1] * 10)
    out = tmp_path / "out"
    assert main(["mrc", "--trace", str(path), "--sizes", "1,2,4", "--opt", "--out", str(out)]) == 0
    data = json.loads((out / "mrc.json").read_text())
    assert [r["size"] for r in data["rows"]] == [1, 2, 4]
    assert (out / "mrc.csv").read_text().startswith("trace,size,lru_hits")
    assert "LRU curve" in (out / "summary.md").read_text()


def test_keying_on_a_small_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    for n in range(5):
        (tree / f"f{n}").write_bytes(b"x" * (n + 1))
    out = tmp_path / "out"
    assert main(["keying", "--tree", str(tree), "--out", str(out)]) == 0
    data = json.loads((out / "keying.json").read_text())
    assert data["trees"][0]["files"] == 5
    assert data["trees"][0]["v1_collisions"] == 0
    assert data["sizes"]["record_bytes_v1"] == 56 and data["sizes"]["record_bytes_v0"] == 40
    assert data["sizes"]["stream_bytes_v1"] > data["sizes"]["stream_bytes_v0"]
    assert "v0 ino coll." in capsys.readouterr().out


def test_simulate_real_stack_default_engine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = lirs_file(tmp_path, [1, 2, 3, 4, 1, 2, 5, 1, 3, 4] * 30)
    assert main(["simulate", "--trace", str(path), "--page-cache", "2", "--tmem", "3", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["engine"] == "stack" and row["wrong_bytes"] == 0
    assert row["tmem_hits"] == row["extra"]["cleancache"]["succ_gets"] > 0
