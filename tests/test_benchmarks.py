"""`make bench` cannot rot: each benchmark runs end to end at its smallest size and its own
agreement checks pass (the numbers themselves are measured, never asserted: docs/benchmarks.md)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.timeout(180, method="thread")


def run_benchmark(name: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True,
                            timeout=150)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_bench_lab_engines_agree() -> None:
    out = run_benchmark("bench_lab.py", "--repeat", "1", "--stack-requests", "20000")
    # The script asserts that the baseline, model, fast path, real stack and inlined loop count the
    # same hits (and the stack served no wrong byte) before it prints this line.
    assert "# agreement: LRU(N+M) hits" in out and "stack = fast = inlined" in out
    rows = [line.split("  ")[0] for line in out.splitlines()]
    for row in ("OrderedDict LRU(N+M) (baseline)", "model:", "fast:", "Belady at N+M", "stack:", "inlined:"):
        assert any(name.startswith(row) for name in rows), row


def test_bench_core_runs() -> None:
    out = run_benchmark("bench_core.py", "--pages", "256", "--pairs", "2000", "--rounds", "1")
    assert "memory per page" in out and "tmemcore Pythonic" in out


@pytest.mark.mount
def test_bench_fuse_runs() -> None:
    if not Path("/dev/fuse").exists() or shutil.which("bindfs") is None:
        pytest.skip("needs /dev/fuse and bindfs (make deps installs it)")
    before = fuse_mounts()
    out = run_benchmark("bench_fuse.py", "--reads", "100", "--rounds", "1", "--seq-mib", "2", "--seq-passes", "1",
                        "--working-set-mib", "1", "--in-process")
    for case in ("bindfs", "mfusepy-min", "guestfs-fc", "guestfs-tmem", "guestfs-miss"):
        assert f"| {case} |" in out, case
    assert fuse_mounts() == before  # every mount it made is gone


def fuse_mounts() -> list[str]:
    return [line for line in Path("/proc/mounts").read_text().splitlines() if " fuse" in line]
