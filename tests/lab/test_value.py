"""The value table and its parts: guest memory cgroups, the reader process, the direct-io loop disk.

The cgroup and value-table tests are real (a memory cgroup, a loop device, tmemd, FUSE and bindfs
mounts) and skip, saying why, where the machine cannot give them; the reader tests need nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from guestfs.lab import guestmem, reader
from guestfs.lab.cli import main

pytestmark = pytest.mark.timeout(120)


def cgroup_or_skip() -> None:
    reason = guestmem.guest_memory_unavailable_reason()
    if reason:
        pytest.skip(f"memory cgroups unavailable: {reason}")


def value_table_or_skip() -> None:
    from guestfs.lab.value import value_table_unavailable_reason

    reason = value_table_unavailable_reason()
    if reason:
        pytest.skip(f"value table unavailable: {reason}")
    if shutil.which("bindfs") is None:
        pytest.skip("bindfs is not installed")


def our_cgroups() -> set[str]:
    return {p.name for p in guestmem.find_cgroup_place().parent.glob("guestfs-lab-*")}


def loop_devices_of(root: Path) -> list[str]:
    listing = subprocess.run(["losetup", "-a"], capture_output=True, text=True, timeout=30, check=False).stdout
    return [line for line in listing.splitlines() if str(root) in line]


def mounts_under(root: Path) -> list[str]:
    with open("/proc/mounts") as table:
        return [line for line in table if str(root) in line]


# -- the reader (no root needed) ------------------------------------------------------------------


def derived_tree(root: Path, files: int, pages: int) -> list[str]:
    root.mkdir()
    names = []
    for file_no in range(files):
        name = f"f{file_no}"
        (root / name).write_bytes(b"".join(reader.page_bytes(file_no, i) for i in range(pages)))
        names.append(name)
    return names


def run_reader(tmp_path: Path, spec: dict[str, object]) -> list[dict[str, object]]:
    path = reader.write_spec(str(tmp_path / "spec.json"), spec)
    done = subprocess.run([sys.executable, "-I", "-S", reader.__file__, path], input="go\n", capture_output=True,
                          text=True, timeout=60, check=True)
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_derived_pages_differ_by_file_and_index() -> None:
    pages = {reader.page_bytes(f, i) for f in range(3) for i in range(3)}
    assert len(pages) == 9 and all(len(page) == 4096 for page in pages)


@pytest.mark.parametrize("direct", [False, True])
def test_reader_checks_every_page_and_counts_a_wrong_one(tmp_path: Path, direct: bool) -> None:
    names = derived_tree(tmp_path / "t", 2, 8)
    reads = [(f, i) for f in range(2) for i in range(8)] * 3
    spec = {"root": str(tmp_path / "t"), "files": names, "check": "derived", "direct": direct, "warmup": True,
            "sequence": reader.write_sequence(str(tmp_path / "seq"), reads)}
    try:
        warm, timed = run_reader(tmp_path, spec)
    except subprocess.CalledProcessError as exc:
        if direct and "Invalid argument" in exc.stderr:
            pytest.skip(f"{tmp_path} refuses O_DIRECT")
        raise
    assert (warm["phase"], warm["pages"], warm["wrong_reads"]) == ("warm", 16, 0)
    assert (timed["reads"], timed["wrong_reads"], timed["short_reads"]) == (48, 0, 0)
    assert len(timed["checkpoints"]) == reader.CHECKPOINTS and timed["anon_bytes"] > 0
    with open(tmp_path / "t" / names[1], "r+b") as f:  # page 5 of file 1 gets file 0's page 5
        f.seek(5 * 4096)
        f.write(reader.page_bytes(0, 5))
    warm, timed = run_reader(tmp_path, spec)
    assert warm["wrong_reads"] == 1 and timed["wrong_reads"] == 3  # read three times, wrong each time


# -- guest memory cgroups --------------------------------------------------------------------------


def test_guest_memory_runs_the_process_inside_and_removes_the_cgroup() -> None:
    cgroup_or_skip()
    before = our_cgroups()
    code = "x = bytearray(4 << 20); print(open('/proc/self/cgroup').read())"
    with guestmem.guest_memory(12 << 20) as cgroup:
        assert cgroup.limit_bytes == 12 << 20 and cgroup.path.is_dir()
        done = guestmem.run_in_cgroup(cgroup, [sys.executable, "-I", "-c", code], timeout=30)
        assert done.returncode == 0, done.stderr
        assert f"/{cgroup.path.name}\n" in done.stdout.decode()
        usage = cgroup.usage()
        assert 4 << 20 <= usage.peak_bytes <= 12 << 20 and usage.oom_kills == 0  # type: ignore[operator]
        with pytest.raises(guestmem.GuestMemoryError, match="OOM killer"):
            guestmem.run_in_cgroup(cgroup, [sys.executable, "-I", "-c", "x = bytearray(64 << 20)"], timeout=30)
    assert not cgroup.path.exists() and our_cgroups() == before


def test_leaving_moves_a_process_still_inside_out_and_removes_the_cgroup() -> None:
    cgroup_or_skip()
    waiting = None
    try:
        with guestmem.guest_memory(16 << 20) as cgroup:
            # blocks on its stdin until we close it: still inside when the block ends
            waiting = guestmem.spawn_in_cgroup(cgroup, [sys.executable, "-I", "-c", "import sys; sys.stdin.read()"],
                                               stdin=subprocess.PIPE)
            assert _wait_until(lambda: cgroup.contains(waiting.pid))  # the shell has entered and exec'd
        assert not cgroup.path.exists() and waiting.poll() is None
        with open(f"/proc/{waiting.pid}/cgroup") as table:
            assert cgroup.path.name not in table.read()
    finally:
        if waiting is not None:
            waiting.communicate(timeout=30)


def _wait_until(condition, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    from tests.polling import wait_for

    return wait_for(condition, timeout)


def test_guest_memory_refuses_less_than_a_page() -> None:
    with pytest.raises(ValueError, match="at least one page"):
        with guestmem.guest_memory(100):
            pass


# -- the value table -----------------------------------------------------------------------------


@pytest.mark.mount
def test_small_value_table_invariants(tmp_path: Path) -> None:
    """The small table through real parts: right bytes everywhere, no tmem hits without tmem, hits
    and fewer backing bytes with tmem >= the working set, and nothing left behind."""
    value_table_or_skip()
    from guestfs.lab.value import flat_rows, render_value_table, value_table, value_targets

    cgroups = our_cgroups()
    table = value_table(8 << 20, reads=3000, tmem_factors=(0, 4), workdir=tmp_path)
    rows = {row["row"]: row for row in table["rows"]}
    assert list(rows) == ["tmem 0", "tmem 4x", "O_DIRECT", "bindfs"]
    assert table["disk"]["direct_io"] is True
    for row in rows.values():
        assert (row["wrong_reads"], row["warmup_wrong_reads"], row["short_reads"]) == (0, 0, 0), row["row"]
        assert row["reads"] == 3000 and row["resident_before_bytes"] == 0, row["row"]  # every row starts cold
        assert "guestfs-lab-" in row["memory_cgroup"] and row["guest"]["limit_bytes"] == 8 << 20
        assert row["guest"]["peak_bytes"] <= 8 << 20
    zero, full = rows["tmem 0"], rows["tmem 4x"]
    assert zero["backing_direct"] and full["backing_direct"]
    assert zero["tmem_hit_ratio"] < 0.01 and zero["succ_gets"] <= 0.01 * zero["fuse_reads"]
    assert full["tmem_hit_ratio"] > 0 and full["succ_gets"] > 0
    assert full["backing_bytes_read"] < zero["backing_bytes_read"]
    assert zero["fuse_reads"] > 0 and zero["host_page_cache_bytes"] == 0  # O_DIRECT misses: no host copy
    assert rows["O_DIRECT"]["device_bytes_read"] >= 3000 * 4096
    assert rows["bindfs"]["host_page_cache_bytes"] > 0  # bindfs lives on the host's page cache
    assert len(value_targets(table["rows"])) == 5 and "| tmem 4x |" in render_value_table(table)
    assert len(flat_rows(table)) == 4
    assert our_cgroups() == cgroups and not loop_devices_of(tmp_path) and not mounts_under(tmp_path)
    assert list(tmp_path.iterdir()) == []  # the image and its temp dir are gone too


@pytest.mark.mount
def test_cli_value_table_writes_its_files(tmp_path: Path) -> None:
    value_table_or_skip()
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    assert main(["--quiet", "live", "--value-table", "--guest-memory", "8M", "--reads", "1000",
                 "--tmem-factors", "0,2", "--no-baselines", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"value.csv", "value.json", "value-time.png", "value-backing.png",
                                               "summary.md"}
    data = json.loads((out / "value.json").read_text())
    assert [row["row"] for row in data["rows"]] == ["tmem 0", "tmem 2x"]
    assert data["settings"]["first_chance"] == "kernel" and data["settings"]["backing_direct"] is True


@pytest.mark.mount
def test_cli_live_sweep_in_guest_memory(tmp_path: Path) -> None:
    """--guest-memory without --value-table: the built-in reader runs in a cgroup, checking digests."""
    cgroup_or_skip()
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing")
    out = tmp_path / "out"
    cgroups = our_cgroups()
    assert main(["--quiet", "live", "--guest-memory", "16M", "--first-chance", "kernel", "--backing-direct",
                 "--workload", "builtin", "--reads", "600", "--files", "12", "--tmem-sizes", "0,1024",
                 "--out", str(out)]) == 0
    runs = json.loads((out / "live.json").read_text())["runs"]
    assert [run["wrong_reads"] for run in runs] == [0, 0]
    assert all(run["guest"]["limit_bytes"] == 16 << 20 and run["first_chance"] == "kernel" for run in runs)
    assert our_cgroups() == cgroups


@pytest.mark.parametrize("argv, message", [
    (["live", "--guest-memory", "1M"], "at least 4M"),
    (["live", "--guest-memory", "lots"], "--guest-memory"),
    (["live", "--tmem-factors", "0,4"], "--tmem-factors: only with --value-table"),
    (["live", "--no-warmup"], "--no-warmup: only with --value-table"),
    (["live", "--profile"], "--profile: only with --value-table"),
    (["live", "--value-table", "--compress"], "--compress: not with --value-table"),
    (["live", "--value-table", "--tmem-factors", "-1"], "--tmem-factors"),
])
def test_live_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.mount
def test_latency_profile_measures_every_layer(tmp_path: Path) -> None:
    value_table_or_skip()
    from guestfs.lab.value import render_latencies, value_latencies

    latencies = value_latencies(pages=256, reads=200, workdir=tmp_path)
    assert len(latencies) == 11 and all(value > 0 for value in latencies.values())
    assert "tmemd get round trip" in render_latencies(latencies)
    assert not loop_devices_of(tmp_path) and not mounts_under(tmp_path) and list(tmp_path.iterdir()) == []
