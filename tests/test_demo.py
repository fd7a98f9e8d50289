"""`make demo` end to end: real mounts, keying table, trace sweep, results written, nothing left mounted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from guestfs import demo
from guestfs.lab.keying import keying_table

pytestmark = [pytest.mark.mount, pytest.mark.timeout(180, method="thread")]


def _fuse_mounts() -> list[str]:
    return [line for line in Path("/proc/mounts").read_text().splitlines() if " fuse" in line]


def test_demo_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not Path("/dev/fuse").exists():
        pytest.skip("no /dev/fuse on this machine")
    before = _fuse_mounts()
    out = tmp_path / "out"
    assert demo.main(["--out", str(out), "--files", "30", "--reads", "800", "--tmem-sizes", "4K,2M"]) == 0
    printed = capsys.readouterr().out
    assert "v0/v1 keying" in printed and "live mounts" in printed
    results = json.loads((out / "demo.json").read_text())
    live = results["live"]
    assert [row["wrong_reads"] for row in live] == [0, 0]
    assert live[0]["tmem_hit"] < live[1]["tmem_hit"]  # a real budget serves reads a one-page host cannot
    assert all(row["victim_identity_holds"] and row["wrong_bytes"] == 0 for row in results["sweep"]["rows"])
    assert all(row["wrong_reads"] == 0 for row in results["keying"]["live"])
    assert {"live.csv", "sweep.csv", "summary.md"} <= {p.name for p in out.iterdir()}
    assert _fuse_mounts() == before


@pytest.mark.parametrize("argv", [["--files", "0"], ["--reads", "-1"], ["--page-cache", "0"],
                                  ["--trace", "/nonexistent/trace"], ["--tmem-sizes", "4K,zz"], ["--seed", "-1"]])
def test_demo_bad_arguments_are_one_line_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("guestfs demo: error:")  # was the usage, then the error


def test_demo_usage_error_through_the_guestfs_command_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-m", "guestfs", "demo", "--files", "0"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=60, check=False)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "guestfs demo: error: argument --files: invalid count '0': must be >= 1\n"  # was 4 lines


@pytest.mark.parametrize(("argv", "message"), [
    (["--trace", "N"], "--trace N does not exist"),  # the lab said the same with exit 1: now both exit 2
    (["--trace", "D"], "--trace D is a directory, not a file"),
    (["--out", "F"], "--out F is not a directory"),
    (["--page-cache", "0"], "argument --page-cache: size '0' must be at least one 4 KiB page"),  # names the option
])
def test_demo_bad_paths_and_sizes_name_the_option(argv: list[str], message: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "D").mkdir()
    (tmp_path / "F").write_text("1\n")
    names = {"N": str(tmp_path / "N"), "D": str(tmp_path / "D"), "F": str(tmp_path / "F")}
    assert demo.main([names.get(a, a) for a in argv]) == 2
    expected = " ".join(names.get(word, word) for word in message.split(" "))
    assert capsys.readouterr().err == f"guestfs demo: error: {expected}\n"


def test_demo_unparsable_trace_is_a_runtime_error_before_any_mount(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "bad.trace"
    trace.write_text("1\nxyz\n")
    assert demo.main(["--trace", str(trace), "--out", str(tmp_path / "out")]) == 1  # as guestfs lab: exit 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and f"{trace}: line 2" in captured.err
    assert "live mounts" not in captured.out and not (tmp_path / "out").exists()


def test_demo_help_shows_one_default_per_option_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    text = demo._parser().format_help()
    flat = " ".join(text.split())
    assert "(default: None)" not in flat  # --trace had its own default and then "(default: None)"
    assert flat.count("(default: the shared LIRS multi2 trace, else a synthetic zipf)") == 1
    assert flat.count("(default: ") == 7  # one per option but --help
    assert max(len(line) for line in text.splitlines()) <= 80


def test_demo_results_use_the_lab_file_names(tmp_path: Path) -> None:
    live = [{"tmem": "4 KiB", "tmem_pages": 1, "reads": 10, "wrong_reads": 0, "first_chance_hit": 0.5,
             "tmem_hit": 0.1, "total_hit": 0.6, "backing_MiB": 0.1}]
    keying_live = [{"abi": "v1", "fold": "-", "mode": "v1", "reads": 10, "wrong_reads": 0, "succ_gets": 1,
                    "fold_collisions": 0, "record_bytes": 56}]
    sweep = [{"tmem_pages": 0, "baseline_hit_ratio": 0.5, "exclusive_hit_ratio": 0.5, "shared_hit_ratio": 0.5,
              "lru_total_hit_ratio": 0.5, "belady_hit_ratio": 0.6, "victim_identity_holds": True, "wrong_bytes": 0}]
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a").write_text("a")
    results = {"live": live, "keying": {"trees": keying_table([tree]), "live": keying_live},
               "sweep": {"trace": "t", "page_cache_pages": 1, "rows": sweep}}
    demo._write_results(tmp_path / "out", results)
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert "keying-live.csv" in names and "keying_live.csv" not in names  # as guestfs lab keying writes it
