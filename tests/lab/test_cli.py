"""guestfs lab CLI: help everywhere, one-line errors, JSON output, experiments writing files."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from guestfs.lab.cli import COMMANDS, UsageError, build_parser, main, parse_pages

REPO_ROOT = Path(__file__).resolve().parents[2]


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


def test_bad_size_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="^guestfs lab simulate: error: argument --tmem: invalid size"):
        build_parser().parse_args(["simulate", "--trace", "x", "--tmem", "lots"])


@pytest.mark.parametrize(("text", "message"), [
    ("2T", "argument --tmem: size '2T' is larger than the 1 TiB limit"),  # had " (or a number of pages)" glued on
    ("268435457", "argument --tmem: size '268435457' is larger than the 1 TiB limit (268,435,456 pages)"),
    ("lots", "argument --tmem: invalid size 'lots': expected a number of 4 KiB pages, or bytes with a K/M/G/T suffix"),
])
def test_size_errors_read_right(text: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--trace", "x", "--tmem", text]) == 2
    assert capsys.readouterr().err == f"guestfs lab simulate: error: {message}\n"


def test_sizes_up_to_1_tib_are_accepted() -> None:
    assert parse_pages("1T") == parse_pages("268435456") == 1 << 28


def _run_guestfs(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "guestfs", *argv], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=60, check=False)


def test_usage_error_is_one_line_on_stderr_through_the_guestfs_command(tmp_path: Path) -> None:
    # was the whole 8-line usage before the error line
    done = _run_guestfs("lab", "simulate", "--trace", "x", "--limit", "0", cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "guestfs lab simulate: error: argument --limit: invalid count '0': must be >= 1\n"


def test_output_cut_short_by_its_reader_is_not_an_error(tmp_path: Path) -> None:
    """`guestfs lab mrc ... | head`: exit as SIGPIPE would, say nothing (was "error: Broken pipe", exit 1)."""
    trace = lirs_file(tmp_path, list(range(1, 200)) * 3)
    sizes = ",".join(map(str, range(1, 3001)))  # far more output than a pipe buffers
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with subprocess.Popen([sys.executable, "-m", "guestfs", "lab", "mrc", "--trace", str(trace), "--sizes", sizes,
                           "--json", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as reader:
        assert reader.stdout is not None and reader.stderr is not None
        assert reader.stdout.read(10)
        reader.stdout.close()  # the reader goes away, as `head` does
        assert reader.wait(timeout=60) == 141
        assert reader.stderr.read() == b""


ONE_LINE_USAGE_ERRORS = [
    [],  # no subcommand
    ["nosuch"],
    ["--bogus"],
    ["simulate"],  # --trace is required
    ["simulate", "--trace", "T", "--engine", "nosuch"],
    ["mrc", "--trace", "T", "--extra"],
    ["hitrate", "--clients", "2", "--weights", "1"],  # a check across options: named after the subcommand
    ["hitrate", "--trace", "T", "--trace", "T", "--clients", "3"],  # was an IndexError traceback mid-run
    ["keying", "--limit", "x"],
    ["live", "--workload", "nosuch"],
]


@pytest.mark.parametrize("argv", ONE_LINE_USAGE_ERRORS, ids=[" ".join(a) or "(none)" for a in ONE_LINE_USAGE_ERRORS])
def test_every_usage_error_is_exactly_one_line_exit_2(argv: list[str], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    trace = lirs_file(tmp_path, [1, 2, 3])
    assert main([str(trace) if a == "T" else a for a in argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    command = argv[0] if argv and not argv[0].startswith("-") and argv[0] != "nosuch" else ""
    assert captured.err.startswith(f"guestfs lab {command}: error: " if command else "guestfs lab: error: ")


def test_malformed_trace_exit_1_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.trace"
    path.write_text("1\n2\nthree\n")
    assert main(["simulate", "--trace", str(path), "--engine", "fast"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "broken.trace: line 3" in err and "Traceback" not in err
    assert err.startswith("guestfs lab simulate: error: ")  # was "guestfs lab: error:" for trace errors only


# --- input paths named on the command line: bad usage (exit 2), one clear line, before any work -----

BAD_PATHS = [  # F: an existing regular file, D: an existing directory, N: a path that does not exist
    (["simulate", "--trace", "N"], "--trace N does not exist"),  # was exit 1, "N: no such trace file"
    (["simulate", "--trace", "D"], "--trace D is a directory, not a file"),  # was "D: no such trace file"
    (["mrc", "--trace", "N"], "--trace N does not exist"),
    (["hitrate", "--trace", "F", "--trace", "N"], "--trace N does not exist"),
    (["keying", "--tree", "N"], "--tree N does not exist"),  # was exit 1, "[Errno 2] No such file or directory"
    (["keying", "--tree", "F"], "--tree F is not a directory"),
    (["live", "--source", "N"], "--source N does not exist"),  # was exit 1, "N: no files to read"
    (["mrc", "--trace", "F", "--out", "F"], "--out F is not a directory"),  # was exit 1, "[Errno 17] File exists"
    (["hitrate", "--out", "F/sub"], "--out F/sub cannot be created: F is not a directory"),
    (["keying", "--tree", "D", "--out", "F"], "--out F is not a directory"),
    (["live", "--out", "F"], "--out F is not a directory"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_PATHS, ids=[" ".join(a) for a, _ in BAD_PATHS])
def test_bad_input_paths_are_one_line_usage_errors(argv: list[str], message: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    names = {"F": str(lirs_file(tmp_path, [1, 2, 3])), "D": str(tmp_path / "dir"), "N": str(tmp_path / "nope")}
    (tmp_path / "dir").mkdir()

    def real(text: str) -> str:
        return re.sub(r"\b[FDN]\b", lambda m: names[m.group()], text)

    assert main(["--quiet", *[real(a) for a in argv]]) == 2
    assert capsys.readouterr().err == f"guestfs lab {argv[0]}: error: {real(message)}\n"


def test_runtime_os_errors_are_one_line_without_errno_text(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    def fails(args: argparse.Namespace) -> int:
        raise PermissionError(13, "Permission denied", "results/keying/keying.csv")

    monkeypatch.setitem(COMMANDS, "keying", fails)
    assert main(["keying", "--tree", "/"]) == 1
    assert capsys.readouterr().err == "guestfs lab keying: error: results/keying/keying.csv: Permission denied\n"


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
    # the save streams are of a pool built for the purpose, and the output says so
    assert (data["sizes"]["stream_pages"], data["sizes"]["stream_objects"]) == (4096, 64)
    assert data["sizes_from_live"] is None
    summary = (out / "summary.md").read_text()
    assert "persistent pool of 4,096 zero pages over 64 objects" in summary and "synthetic" in summary
    assert (out / "keying.csv").is_file()


def test_keying_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a").write_bytes(b"a")
    out = tmp_path / "out"
    assert main(["--quiet", "keying", "--tree", str(tree), "--out", str(out)]) == 0
    assert (out / "keying.png").read_bytes().startswith(b"\x89PNG")
    assert "keying.png" in (out / "summary.md").read_text()


def test_simulate_real_stack_default_engine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = lirs_file(tmp_path, [1, 2, 3, 4, 1, 2, 5, 1, 3, 4] * 30)
    assert main(["simulate", "--trace", str(path), "--page-cache", "2", "--tmem", "3", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["engine"] == "stack" and row["wrong_bytes"] == 0
    assert row["tmem_hits"] == row["extra"]["cleancache"]["succ_gets"] > 0


# --- argument validation: every bad value is a usage error (exit 2), never a traceback ------------

BAD_ARGUMENTS = [
    (["simulate", "--trace", "T", "--limit", "-3"], "--limit"),  # was trace.head(-3): drops the last 3
    (["simulate", "--trace", "T", "--limit", "0"], "--limit"),  # was "replay everything"
    (["mrc", "--trace", "T", "--limit", "x"], "--limit"),
    (["hitrate", "--clients", "0"], "--clients"),  # was run as 1 client
    (["hitrate", "--clients", "2", "--weights", "1,2,3"], "--weights"),  # was a late ValueError, exit 1
    (["mrc", "--trace", "T", "--sizes", "0"], "--sizes"),
    (["mrc", "--trace", "T", "--sizes", ","], "--sizes"),
    (["live", "--reads", "0"], "--reads"),  # was an empty row
    (["live", "--reads", "-5"], "--reads"),  # was "negative dimensions are not allowed"
    (["live", "--files", "0"], "--files"),
    (["live", "--seed", "-1"], "--seed"),
    (["live", "--page-cache", "0"], "--page-cache"),
    (["simulate", "--trace", "T", "--page-cache", "0"], "--page-cache"),  # was exit 1
    (["hitrate", "--page-cache", "0K"], "--page-cache"),
    (["keying", "--limit", "0"], "--limit"),
]


@pytest.mark.parametrize(("argv", "option"), BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_values_are_usage_errors(argv: list[str], option: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    trace = lirs_file(tmp_path, [1, 2, 3])
    argv = [str(trace) if a == "T" else a for a in argv]
    assert main(["--quiet", *argv, "--out", str(tmp_path / "out")] if argv[0] in ("live", "keying") else argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"guestfs lab {argv[0]}: error: argument {option}")
    assert not (tmp_path / "out").exists()  # nothing ran


def test_limit_replays_exactly_the_first_n_requests(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = lirs_file(tmp_path, list(range(1, 11)))
    assert main(["simulate", "--trace", str(path), "--limit", "3", "--engine", "fast", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["requests"] == 3


def test_zero_tmem_sizes_stay_valid() -> None:
    args = build_parser().parse_args(["live", "--tmem-sizes", "0,4M"])
    assert args.tmem_sizes == [0, 1024]
    args = build_parser().parse_args(["simulate", "--trace", "x", "--tmem", "0"])
    assert args.tmem == [0]


# --- --help: exactly one sensible default per option --------------------------------------------


def _all_parsers() -> list[argparse.ArgumentParser]:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [parser, *subparsers.choices.values()]


@pytest.mark.parametrize("parser", _all_parsers(), ids=lambda p: p.prog)
def test_every_option_shows_exactly_one_default(parser: argparse.ArgumentParser) -> None:
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or "--help" in action.option_strings:
            continue
        text = formatter._expand_help(action)
        name = action.option_strings[0]
        assert text.count("default") == (0 if action.required else 1), f"{parser.prog} {name}: {text!r}"
        assert "None" not in text and "False" not in text, f"{parser.prog} {name}: {text!r}"
    help_text = " ".join(parser.format_help().split())
    assert "(default: None)" not in help_text
    assert not re.search(r"\(default: [^)]*\) \(default:", help_text)  # was "(default: detected) (default: None)"
    assert "--quiet no progress bars (default: off)" in help_text


def test_top_level_help_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "guestfs lab: trace-driven" in out and "``" not in out  # was "``guestfs lab``:"


@pytest.mark.parametrize("parser", _all_parsers(), ids=lambda p: p.prog)
def test_help_is_wrapped_to_the_terminal(parser: argparse.ArgumentParser, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    lines = parser.format_help().splitlines()
    assert max(len(line) for line in lines) <= 80, [line for line in lines if len(line) > 80]


@pytest.mark.parametrize("argv", [["simulate", "--tmem", "8"], ["simulate", "--tmem", "8", "--json"],
                                  ["hitrate", "--tmem-sizes", "8", "--no-opt"]])
def test_a_replay_that_serves_wrong_bytes_exits_3(argv: list[str], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Exit status 3 is the stamp check failing: a cache bug, told apart from a run that merely missed
    (`simulate --json` and `hitrate` exited 0 while reporting wrong bytes)."""
    from guestfs.pagecache import PageCache

    real = PageCache.get_or_load

    def corrupt_tmem_hits(self, key, index, loader):  # type: ignore[no-untyped-def]
        data, where = real(self, key, index, loader)
        return (b"\xff" * len(data), where) if where == "tmem" else (data, where)

    monkeypatch.setattr(PageCache, "get_or_load", corrupt_tmem_hits)
    trace = lirs_file(tmp_path, [1, 2, 3, 4, 5, 1, 2, 3, 4, 5] * 20)
    extra = ["--out", str(tmp_path / "out"), "--page-cache", "2"] if argv[0] == "hitrate" else ["--page-cache", "2"]
    assert main(["--quiet", argv[0], "--trace", str(trace), *argv[1:], *extra]) == 3
    capsys.readouterr()
    monkeypatch.setattr(PageCache, "get_or_load", real)
    assert main(["--quiet", argv[0], "--trace", str(trace), *argv[1:], *extra]) == 0
