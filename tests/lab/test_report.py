"""Result files and progress bars."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from guestfs.lab.report import Progress, markdown_table, run_metadata, write_csv, write_json, write_summary


def test_csv_columns_are_the_union_and_skip_nested(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "r.csv", [{"a": 1, "b": 0.5, "nested": {"x": 1}}, {"a": 2, "c": None}])
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == ["a", "b", "c"]
    assert rows[0]["b"] == "0.500000" and rows[1]["c"] == ""


def test_json_and_summary(tmp_path: Path) -> None:
    write_json(tmp_path / "r.json", {"meta": run_metadata(["x"]), "rows": [1]})
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["meta"]["command"] == ["x"] and data["rows"] == [1]
    write_summary(tmp_path / "s.md", "Title", [("Part", "body")])
    assert (tmp_path / "s.md").read_text().startswith("# Title\n\n## Part\n\nbody")


def test_markdown_table_formats_ratios_counts_and_flags() -> None:
    text = markdown_table([{"n": 1234, "r": 0.5, "ok": True}], ["n", "r", "ok"])
    assert text.splitlines()[2] == "| 1,234 | 50.00 % | yes |"


def test_progress_is_off_when_quiet_or_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    with Progress(10, "x", quiet=True) as bar:
        assert bar.callback is None
        bar(5)  # a no-op, never an error
    with Progress(10, "x") as bar:  # pytest's stderr is not a terminal
        assert bar.callback is None
    assert capsys.readouterr().err == ""
