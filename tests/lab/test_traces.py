"""Trace loading: every format, compression, write handling, detection, one-line errors."""

from __future__ import annotations

import gzip
import lzma
import struct
from pathlib import Path

import numpy as np
import pytest

from guestfs.lab.traces import MSR_PAGE_BITS, TraceError, expand_runs, load_trace, synthetic_zipf


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_lirs_skips_markers_and_blank_lines(tmp_path: Path) -> None:
    trace = load_trace(write(tmp_path / "t.trace", "5\n*\n\n7\n5\n"))
    assert trace.format == "lirs"
    assert trace.keys.tolist() == [5, 7, 5]
    assert trace.keys.dtype == np.int64
    assert trace.unique() == 2


def test_arc_lines_expand_to_block_runs(tmp_path: Path) -> None:
    trace = load_trace(write(tmp_path / "t.lis", "10 3 0 0\n2 1 0 1\n"))
    assert trace.format == "arc"
    assert trace.keys.tolist() == [10, 11, 12, 2]
    assert trace.source_requests == 2


def test_expand_runs_handles_zero_counts() -> None:
    out = expand_runs(np.array([5, 9, 1], dtype=np.int64), np.array([2, 0, 3], dtype=np.int64))
    assert out.tolist() == [5, 6, 1, 2, 3]


def test_oracle_general_records(tmp_path: Path) -> None:
    raw = b"".join(struct.pack("<IQIq", t, obj, 4096, -1) for t, obj in [(1, 42), (2, 7), (3, 42)])
    path = tmp_path / "x.oracleGeneral.bin"
    path.write_bytes(raw)
    trace = load_trace(path)
    assert trace.format == "oracle"
    assert trace.keys.tolist() == [42, 7, 42]


def test_oracle_truncated_record_names_the_record(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(struct.pack("<IQIq", 1, 2, 3, 4) + b"\1\2\3")
    with pytest.raises(TraceError, match=r"x\.bin: record 2: truncated"):
        load_trace(path)


def test_cloudphysics_reads_only_split_into_pages(tmp_path: Path) -> None:
    text = "version,time,op,size,lbn\n1,1,28,8192,8\n1,2,2a,4096,0\n1,3,28,512,15\n"
    path = write(tmp_path / "cp.csv", text)
    reads = load_trace(path)
    assert reads.format == "cloudphysics"
    # lbn 8 = byte 4096: pages 1..2; lbn 15 = byte 7680, 512 bytes: page 1
    assert reads.keys.tolist() == [1, 2, 1]
    with_writes = load_trace(path, include_writes=True)
    assert with_writes.keys.tolist() == [1, 2, 0, 1]


def test_msr_keys_by_host_disk_page(tmp_path: Path) -> None:
    text = (
        "128166372003061629,hm,0,Read,8192,4096,100\n"
        "128166372003061630,hm,1,Read,8192,8192,100\n"
        "128166372003061631,hm,0,Write,0,4096,100\n"
    )
    path = write(tmp_path / "msr.csv", text)
    trace = load_trace(path)
    assert trace.format == "msr"
    assert trace.keys.tolist() == [2, (1 << MSR_PAGE_BITS) | 2, (1 << MSR_PAGE_BITS) | 3]
    assert load_trace(path, include_writes=True).requests == 4


@pytest.mark.parametrize("suffix", [".gz", ".xz", ".zst"])
def test_compressed_traces(tmp_path: Path, suffix: str) -> None:
    body = b"1\n2\n1\n"
    if suffix == ".gz":
        data = gzip.compress(body)
    elif suffix == ".xz":
        data = lzma.compress(body)
    else:
        zstandard = pytest.importorskip("zstandard")
        data = zstandard.ZstdCompressor().compress(body)
    path = tmp_path / f"t.trace{suffix}"
    path.write_bytes(data)
    assert load_trace(path).keys.tolist() == [1, 2, 1]


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        ("bad.trace", "1\n2\nxyz\n", "line 3"),
        ("bad.lis", "1 2 0 0\n1 2 0\n", "line 2"),
        ("bad.csv", "version,time,op,size,lbn\n1,2,28,512,9\n1,2,zz,512\n", "line 3"),
        ("msr.csv", "1,h,0,Read,0,512,1\n1,h,0,Read,-4,512,1\n", "line 2"),
        # numbers past int64 were "huge.trace: malformed trace" (no line) or an OverflowError traceback
        ("huge.trace", "1\n99999999999999999999999\n", "line 2: block number larger than"),
        ("huge.lis", "1 1 0 1\n99999999999999999999 1 0 2\n", "line 2: block numbers larger than"),
        ("wrap.lis", "1 1 0 1\n9223372036854775807 5 0 2\n", "line 2: block numbers larger than"),
        ("huge.csv", "version,time,op,size,lbn\n1,2,28,512,99999999999999999999\n", "line 2: lbn, size or op too"),
        ("hugemsr.csv", "1,h,0,Read,0,512,1\n1,h,0,Read,99999999999999999999,512,1\n", "line 2: offset + size"),
        # a negative block was refused in .lis traces but replayed from LIRS text traces
        ("neg.trace", "1\n2\n-5\n", "line 3: negative block number"),
        ("neg.lis", "1 1 0 1\n-5 1 0 2\n", "line 2: negative start or count"),
        # 3 + 5 fields made two rows of four: accepted as if well formed
        ("shifted.lis", "1 2 3\n4 5 6 7 8\n", "line 1: expected 'start count ignore reqno'"),
        # a run or size field asking for 10^11 pages was a 37-line MemoryError traceback
        ("runaway.lis", "0 100000000000 0 0\n", "expands to 100,000,000,000 page requests"),
        ("wraps.lis", "0 4611686018427387904 0 0\n0 4611686018427387904 0 0\n", "more than the lab handles"),
        ("runaway.csv", "version,time,op,size,lbn\n1,2,28,400000000000000,0\n", "expands to 97,656,250,000"),
        # a CSV with a header of neither kind was read as LIRS ("expected one integer block number")
        ("other.csv", "ver,time,op,size,lbn\n1,2,28,4096,0\n", "looks like CSV but is neither CloudPhysics"),
    ],
)
def test_malformed_trace_error_names_file_and_line(tmp_path: Path, name: str, text: str, where: str) -> None:
    path = write(tmp_path / name, text)
    with pytest.raises(TraceError) as info:
        load_trace(path)
    message = str(info.value)
    assert name in message and where in message
    assert "\n" not in message


def test_missing_and_empty_traces(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no such trace file"):
        load_trace(tmp_path / "nope.trace")
    with pytest.raises(TraceError, match="is a directory, not a trace file"):  # was "no such trace file"
        load_trace(tmp_path)
    with pytest.raises(TraceError, match="no .*requests"):
        load_trace(write(tmp_path / "empty.trace", "*\n\n"))


def test_synthetic_zipf_is_seeded() -> None:
    a = synthetic_zipf(5000, 300, 0.9, seed=4)
    b = synthetic_zipf(5000, 300, 0.9, seed=4)
    c = synthetic_zipf(5000, 300, 0.9, seed=5)
    assert np.array_equal(a.keys, b.keys)
    assert not np.array_equal(a.keys, c.keys)
    assert a.keys.min() >= 0 and a.keys.max() < 300


@pytest.mark.traces
def test_shared_trace_counts(traces_dir: Path) -> None:
    """Requests and unique keys as listed in the shared traces README."""
    expected = {
        "lirs/cpp.trace.gz": (9047, 1223),
        "lirs/2_pools.trace.gz": (100_000, 9939),
        "cloudphysics/cloudPhysicsIO.oracleGeneral.bin": (113_872, 48_974),
        "arc/OLTP.lis.zst": (914_145, 186_880),
    }
    for name, (requests, unique) in expected.items():
        trace = load_trace(traces_dir / name)
        assert (trace.requests, trace.unique()) == (requests, unique), name
    pages = load_trace(traces_dir / "cloudphysics/cloudPhysicsIO.csv", include_writes=True)
    assert (pages.requests, pages.unique()) == (1_141_869, 269_210)


def test_zst_falls_back_to_the_zstd_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    import subprocess
    import sys

    if shutil.which("zstd") is None:
        pytest.skip("the zstd CLI is not installed")
    plain = tmp_path / "t.lis"
    plain.write_text("4 2 0 0\n")
    subprocess.run(["zstd", "-q", str(plain)], check=True, timeout=30)
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard now raises ImportError
    assert load_trace(tmp_path / "t.lis.zst").keys.tolist() == [4, 5]


def test_corrupt_compressed_trace_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.trace.gz"
    path.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(TraceError, match="bad.trace.gz: cannot read"):
        load_trace(path)


def test_truncated_zst_trace_is_an_error_not_a_shorter_trace(tmp_path: Path) -> None:
    zstandard = pytest.importorskip("zstandard")
    body = "".join(f"{(i * 7919) % 5000}\n" for i in range(50_000)).encode()
    whole = zstandard.ZstdCompressor().compress(body)
    (tmp_path / "two.trace.zst").write_bytes(whole + whole)  # several frames: all read
    assert load_trace(tmp_path / "two.trace.zst").requests == 100_000
    (tmp_path / "cut.trace.zst").write_bytes(whole[: len(whole) // 2])  # was 20-odd thousand requests, exit 0
    with pytest.raises(TraceError, match="cut.trace.zst: cannot decompress: truncated"):
        load_trace(tmp_path / "cut.trace.zst")
