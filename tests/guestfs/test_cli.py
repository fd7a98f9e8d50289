"""guestfs CLI: help text with defaults, one-line usage errors with exit 2, delegation to lab/demo."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from guestfs import cli


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "guestfs", *args], capture_output=True, text=True, timeout=60)


def test_mount_help_documents_every_option_with_its_default() -> None:
    result = run_cli("mount", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    options = [opt for opt in re.findall(r"^  (-[-\w]+(?:, --[-\w]+)?)", result.stdout, re.MULTILINE)
               if opt not in ("-h, --help",)]
    assert len(options) >= 14
    # every option's help paragraph carries "(default: ...)"
    paragraphs = re.split(r"\n  (?=-)", result.stdout.split("options:", 1)[1])
    for paragraph in paragraphs:
        if not paragraph.strip() or paragraph.strip().startswith("-h, --help"):
            continue
        assert "default:" in " ".join(paragraph.split()), paragraph
    for expected in ("(default: 16M)", "(default: 256M", "(default: auto)", "(default: xxh64)", "(default: 1.0)"):
        assert expected in text


@pytest.mark.parametrize("args, fragment", [
    (["--page-cache", "12X"], "invalid size '12X'"),
    (["--tmem=-5M"], "invalid size '-5M'"),
    (["--page-cache", "0"], "at least 4096 bytes"),
    (["--abi", "v7"], "invalid choice"),
    (["-o", "direct_io"], "not a supported FUSE option"),
    (["--attr-timeout", "soon"], "invalid float value"),
    (["--nonsense"], "unrecognized arguments"),
])
def test_bad_mount_options_exit_2_with_one_line(tmp_path: Path, args: list[str], fragment: str) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "mnt").mkdir()
    result = run_cli("mount", str(tmp_path / "src"), str(tmp_path / "mnt"), *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and fragment in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("layout, fragment", [
    ("missing-source", "does not exist"),
    ("file-mountpoint", "is not a directory"),
    ("missing-mountpoint", "is not a directory"),
])
def test_bad_paths_exit_2_before_any_mount(tmp_path: Path, layout: str, fragment: str) -> None:
    source, mnt = tmp_path / "src", tmp_path / "mnt"
    if layout != "missing-source":
        source.mkdir()
    if layout == "file-mountpoint":
        mnt.write_text("x")
    elif layout != "missing-mountpoint":
        mnt.mkdir()
    result = run_cli("mount", str(source), str(mnt))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and fragment in result.stderr


def test_missing_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_delegate_not_available_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(cli._DELEGATES, "lab", ("guestfs.no_such_lab.cli", "main"))
    assert cli.main(["lab", "replay"]) == 1
    assert capsys.readouterr().err.strip() == "guestfs lab: not available (guestfs.no_such_lab.cli is not installed)"


def test_delegate_passes_remaining_argv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "fake_demo.py").write_text("seen = []\ndef main(argv):\n    seen.append(argv)\n    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli._DELEGATES, "demo", ("fake_demo", "main"))
    assert cli.main(["demo", "--quick", "x"]) == 3
    import fake_demo  # type: ignore[import-not-found]

    assert fake_demo.seen == [["--quick", "x"]]


def test_format_stats_flattens_nested_counters() -> None:
    text = cli.format_stats({"mode": "v1", "succ_gets": 2, "host": {"pools": 1}})
    assert text.splitlines()[0] == "keying/ABI: v1"
    assert any(line.split() == ["host.pools", "1"] for line in text.splitlines())
