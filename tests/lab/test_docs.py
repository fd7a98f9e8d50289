"""docs/experiments.md says exactly which files each lab command writes: run the commands and compare."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from guestfs.lab.cli import main

DOC = Path(__file__).resolve().parents[2] / "docs" / "experiments.md"


def documented_outputs() -> dict[str, set[str]]:
    """command -> the file names its row of the "What each command writes" table lists."""
    rows: dict[str, set[str]] = {}
    for line in DOC.read_text().splitlines():
        match = re.match(r"^\| `(\w+)` \|[^|]*\| (.*) \|$", line)
        if match:
            rows[match.group(1)] = set(re.findall(r"`([\w<>-]+\.(?:csv|json|png|md))`", match.group(2)))
    return rows


def written(out: Path) -> set[str]:
    return {p.name for p in out.iterdir()} if out.is_dir() else set()


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    path = tmp_path / "t.trace"
    path.write_text("\n".join(str(k % 37) for k in range(0, 3000, 7)) + "\n")
    return path


def test_the_doc_lists_every_command() -> None:
    assert set(documented_outputs()) == {"simulate", "mrc", "hitrate", "keying", "live"}  # was "each writes ..."


def test_simulate_writes_nothing(trace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    before = set(os.listdir(tmp_path))
    assert main(["--quiet", "simulate", "--trace", str(trace), "--engine", "fast"]) == 0
    assert set(os.listdir(tmp_path)) == before and documented_outputs()["simulate"] == set()


def test_mrc_writes_the_documented_files_only_with_out(trace: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    assert main(["--quiet", "mrc", "--trace", str(trace), "--sizes", "4,8"]) == 0
    assert not (tmp_path / "results").exists()
    assert main(["--quiet", "mrc", "--trace", str(trace), "--sizes", "4,8", "--out", "o"]) == 0
    assert written(tmp_path / "o") == documented_outputs()["mrc"]


def test_hitrate_writes_the_documented_files_by_default(trace: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    assert main(["--quiet", "hitrate", "--trace", str(trace), "--trace", str(trace), "--page-cache", "4",
                 "--tmem-sizes", "0,8", "--engine", "model"]) == 0
    expected = {name.replace("<trace>", "t") for name in documented_outputs()["hitrate"]}
    assert written(tmp_path / "results" / "hitrate") == expected  # clients.csv: two traces


def test_keying_writes_the_documented_files_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a").write_bytes(b"a")
    monkeypatch.chdir(tmp_path)
    assert main(["--quiet", "keying", "--tree", str(tree)]) == 0
    expected = documented_outputs()["keying"] - {"keying-live.csv", "keying-live.png"}  # those need --live
    assert written(tmp_path / "results" / "keying") == expected
