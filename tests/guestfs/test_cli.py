"""guestfs CLI: help text with defaults, one-line usage errors with exit 2, delegation to lab/demo."""

from __future__ import annotations

import os
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
    assert "--client-id" in text and "empty directory" not in text
    assert "directory to mount on (its contents are hidden while mounted)" in text


def test_top_level_help_describes_lab_and_demo_for_users() -> None:
    result = run_cli("--help")
    text = " ".join(result.stdout.split())
    assert result.returncode == 0 and ".main" not in text and "remaining arguments" not in text
    assert "lab trace-driven hit-rate experiments (see guestfs lab --help)" in text
    assert "demo mount a sample tree, run a workload, show hit rates and v0/v1 keying" in text


@pytest.mark.parametrize("args, fragment", [
    (["--page-cache", "12X"], "invalid size '12X'"),
    (["--tmem=-5M"], "invalid size '-5M'"),
    (["--page-cache", "0"], "--page-cache must be at least 1 byte"),
    (["--page-cache", "99999999999999G"], "larger than the 1 TiB limit"),
    (["--abi", "v7"], "invalid choice"),
    (["-o", "direct_io"], "not a supported FUSE option"),
    (["--attr-timeout", "soon"], "--attr-timeout: must be a number of seconds"),
    (["--attr-timeout", "nan"], "--attr-timeout: must be a finite number of seconds >= 0 and <= 3600, got 'nan'"),
    (["--attr-timeout", "inf"], "finite number of seconds >= 0"),
    (["--timeout", "nan"], "--timeout: must be a finite number of seconds > 0, got 'nan'"),
    (["--timeout", "0"], "--timeout: must be a finite number of seconds > 0"),
    (["--timeout=-inf"], "--timeout: must be a finite number of seconds > 0"),
    (["--client-id", "0"], "must be a client id in 1..65534"),
    (["--client-id", "x"], "must be a client id in 1..65534"),
    (["--server", "unix:/run/x.sock", "--tmem", "1M"], "--tmem configures the embedded host"),
    (["--server", "unix:/run/x.sock", "--host-spec", "both"], "--host-spec configures the embedded host"),
    (["--server", "unix:/run/x.sock", "--compress"], "--compress needs the embedded host"),
    (["--nonsense"], "unrecognized arguments"),
    (["--tmem", ""], "--tmem: invalid size ''"),  # not silently the default
    (["--attr-timeout", "3601"], "--attr-timeout: must be a finite number of seconds >= 0 and <= 3600, got '3601'"),
    (["-o", "entry_timeout=abc"], "-o entry_timeout must be a number of seconds"),
    (["-o", "fsname="], "-o fsname= needs a value"),
    (["--page-cache", "16M"], "with --first-chance kernel the kernel's page cache is the first chance"),
    (["--first-chance", "user"], "invalid choice"),
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


@pytest.mark.parametrize("abi", ["auto", "v1"])
def test_unreachable_server_fails_before_mounting(tmp_path: Path, abi: str) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "mnt").mkdir()
    address = f"unix:{tmp_path}/no-tmemd.sock"
    result = run_cli("mount", str(tmp_path / "src"), str(tmp_path / "mnt"), "--server", address, "--abi", abi)
    assert result.returncode == 1
    assert result.stderr == f"guestfs mount: cannot reach tmemd at {address}: No such file or directory\n"
    assert not os.path.ismount(tmp_path / "mnt")


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
    text = cli.format_stats({"mode": "v1", "succ_gets": 2, "host": {"pools": 1, "clients": [{"cli_id": 1}]}},
                            everything=True)
    assert text.splitlines()[0] == "keying/ABI: v1, embedded host"
    assert any(line.split() == ["host.pools", "1"] for line in text.splitlines())
    assert any(line.split() == ["host.clients[0].cli_id", "1"] for line in text.splitlines())


def test_format_stats_summary_names_layers_and_this_guests_pool() -> None:
    stats = {"mode": "v0-ino", "abi": "auto", "client_id": 3, "pool_id": 0, "succ_gets": 5, "failed_gets": 7,
             "puts": 9, "invalidates": 1, "fold_collisions": 2, "page_cache_hits": 11, "backing_bytes_read": 4096,
             "host": {"clients": [{"cli_id": 3, "pools": [{"pool_id": 0, "type": "EP", "found_gets": 5, "gets": 12}]}]}}
    text = cli.format_stats(stats)
    assert text.splitlines()[0] == "keying/ABI: v0-ino (requested --abi auto), client 3, embedded host"
    words = [line.split() for line in text.splitlines()]
    for expected in (["succ_gets", "5"], ["failed_gets", "7"], ["puts", "9"], ["invalidates", "1"],
                     ["v0", "fold", "collisions", "2"], ["hits", "11"], ["bytes", "read", "4096"],
                     ["found_gets", "5"], ["gets", "12"]):
        assert expected in words
    assert "all counters" not in text
