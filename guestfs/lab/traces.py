"""Block traces as numpy int64 key arrays: loading, format detection, decompression, synthesis.

Formats (``--format`` or detected from the name and the first bytes):

- ``lirs``   text, one block number (0 .. 2**63-1, as in ``arc``) per line; ``*`` (LIRS checkpoint
             marker) and blank lines skipped.
- ``arc``    ARC ``.lis`` text, ``start count ignore reqno`` per line, expanded to blocks
             ``start .. start+count-1``.
- ``oracle`` libCacheSim oracleGeneral binary, 24-byte little-endian records ``<IQIq``
             (ts, obj_id, obj_size, next_access_vtime); the key is obj_id.
- ``cloudphysics`` CSV with header ``version,time,op,size,lbn``: lbn in 512-byte sectors, size in
             bytes, op the SCSI opcode in hex; split into 4 KiB pages
             ``lbn*512//4096 .. (lbn*512+size-1)//4096``.
- ``msr``    MSR Cambridge CSV ``Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime``
             (offset and size in bytes) split into 4 KiB pages and keyed by (host, disk, page).

Writes: a page cache only ever receives *reads* from the disk (a write makes the page dirty, and
cleancache only sees clean pages), so CSV traces keep only reads by default. ``include_writes=True``
treats every write like a read of the same pages (useful to compare with tools that do so).

Compression by suffix: ``.gz``, ``.xz``, ``.zst`` (the ``zstandard`` module, else the ``zstd`` CLI).

A malformed trace raises ``TraceError`` whose message is one line naming the file and the line
(text) or record (binary) number: also a negative block number or one that does not fit int64.
"""

from __future__ import annotations

import gzip
import lzma
import shutil
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PAGE_BYTES = 4096
SECTOR_BYTES = 512
FORMATS = ("lirs", "arc", "oracle", "cloudphysics", "msr")
COMPRESSIONS = (".gz", ".xz", ".zst")
ORACLE_RECORD = np.dtype([("ts", "<u4"), ("obj_id", "<u8"), ("obj_size", "<u4"), ("next_access", "<i8")])
assert ORACLE_RECORD.itemsize == 24
# MSR keys pack (device id, page): 2**40 pages of 4 KiB is 4 PiB per disk, far beyond any MSR volume.
MSR_PAGE_BITS = 40
INT64_MAX = (1 << 63) - 1  # keys are int64: a block number must fit (0 .. INT64_MAX)
# Page requests one trace may expand to: 2**30 keys take 8 GiB as int64 (and more as the Python
# ints a replay walks), far beyond a trace the lab can replay; a run or size field that asks for
# more is corrupt, and refusing it beats the allocation failing (or the OOM killer) halfway.
MAX_PAGE_REQUESTS = 1 << 30


class TraceError(ValueError):
    """A trace could not be read; the message is one line naming the file and position."""


class TooManyRequests(ValueError):
    """A trace's runs or sizes expand to more page requests than MAX_PAGE_REQUESTS (no path yet:
    ``load_trace`` names the file)."""


@dataclass(frozen=True)
class Trace:
    """A page-request trace: ``keys[i]`` is the page (block) key of request i."""

    name: str
    keys: np.ndarray  # int64, one entry per page request
    format: str
    source_requests: int  # records/lines in the file that became requests (before page splitting)

    @property
    def requests(self) -> int:
        return int(self.keys.size)

    def unique(self) -> int:
        return int(np.unique(self.keys).size)

    def head(self, n: int) -> "Trace":
        """The first n requests (for quick runs)."""
        return Trace(self.name, self.keys[:n], self.format, min(n, self.source_requests))


# --- decompression --------------------------------------------------------------------------


def _zstd_bytes(path: Path) -> bytes:
    try:
        import zstandard
    except ImportError:
        zstandard = None
    if zstandard is not None:
        rest, frames = path.read_bytes(), []
        try:
            while rest:  # frame by frame: a stream reader hands back a truncated frame's prefix silently
                frame = zstandard.ZstdDecompressor().decompressobj()
                frames.append(frame.decompress(rest))
                if not frame.eof:
                    raise TraceError(f"{path}: cannot decompress: truncated zstd data (its last frame is incomplete)")
                rest = frame.unused_data
        except zstandard.ZstdError as exc:
            raise TraceError(f"{path}: cannot decompress: {exc}") from None
        return b"".join(frames)
    if shutil.which("zstd") is None:
        raise TraceError(f"{path}: .zst trace needs the zstandard module or the zstd CLI")
    done = subprocess.run(["zstd", "-dc", str(path)], capture_output=True, timeout=300, check=False)
    if done.returncode != 0:
        raise TraceError(f"{path}: zstd -dc failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


def read_bytes(path: Path) -> bytes:
    """The decompressed content of a trace file."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".gz":
            return gzip.decompress(path.read_bytes())
        if suffix == ".xz":
            return lzma.decompress(path.read_bytes())
        if suffix == ".zst":
            return _zstd_bytes(path)
        return path.read_bytes()
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
        raise TraceError(f"{path}: cannot read: {exc}") from None


def inner_name(path: Path) -> str:
    """The file name without its compression suffix (``OLTP.lis.zst`` -> ``OLTP.lis``)."""
    name = path.name
    for suffix in COMPRESSIONS:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def trace_name(path: Path) -> str:
    name = inner_name(path)
    for suffix in (".trace", ".lis", ".csv", ".bin", ".txt"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name.removesuffix(".oracleGeneral")


# --- format detection -------------------------------------------------------------------------


def _first_data_line(raw: bytes) -> str:
    for line in raw[:65536].decode("ascii", errors="replace").splitlines():
        stripped = line.strip()
        if stripped and stripped != "*":
            return stripped
    return ""


def detect_format(path: Path, raw: bytes) -> str:
    """Guess the format from the (inner) file name, then from the first line."""
    name = inner_name(path).lower()
    if name.endswith(".lis"):
        return "arc"
    if name.endswith(".bin") or "oraclegeneral" in name:
        return "oracle"
    if b"\0" in raw[:4096]:
        return "oracle"
    first = _first_data_line(raw)
    if first.lower().startswith("version,time,op,size,lbn"):
        return "cloudphysics"
    fields = first.split(",")
    if len(fields) == 7 and fields[3].strip().lower() in ("read", "write", "type"):
        return "msr"
    if "," in first:
        raise TraceError(f"{path}: line {first[:60]!r} looks like CSV but is neither CloudPhysics (header "
                         "'version,time,op,size,lbn') nor MSR (timestamp,host,disk,type,offset,size,latency); "
                         "pass --format")
    words = first.split()
    if len(words) == 4 and all(w.lstrip("-").isdigit() for w in words):
        return "arc"
    if len(words) <= 1:
        return "lirs"  # also an empty trace, which then fails as "no requests"
    raise TraceError(f"{path}: cannot detect the trace format from line {first[:60]!r}; pass --format")


# --- parsers ----------------------------------------------------------------------------------


def _bad_line(path: Path, lines: list[str], check) -> TraceError:
    """Find the first line ``check`` rejects; slow, runs only after the fast path failed."""
    for number, line in enumerate(lines, start=1):
        reason = check(line)
        if reason:
            return TraceError(f"{path}: line {number}: {reason}: {line.strip()[:60]!r}")
    # a check that disagrees with its fast path is a bug here, not in the trace: say so rather than guess
    return TraceError(f"{path}: malformed trace (no single bad line found; please report this trace)")


def _check_lirs_line(line: str) -> str:
    text = line.strip()
    if not text or text == "*":
        return ""
    try:
        block = int(text)
    except ValueError:
        return "expected one integer block number"
    return _check_block(block)


def _check_block(block: int) -> str:
    if block < 0:
        return "negative block number"
    if block > INT64_MAX:
        return f"block number larger than {INT64_MAX} (int64)"
    return ""


def parse_lirs(path: Path, raw: bytes) -> tuple[np.ndarray, int]:
    text = raw.decode("ascii", errors="replace")
    tokens = [t for t in text.split() if t != "*"]
    try:
        keys = np.array(tokens, dtype=np.int64)
    except (ValueError, OverflowError):
        raise _bad_line(path, text.splitlines(), _check_lirs_line) from None
    # tokens came from split(): a line with two numbers would slip through; check the line count.
    lines = [ln for ln in text.splitlines() if ln.strip() and ln.strip() != "*"]
    if len(lines) != len(tokens) or (keys < 0).any():  # negative blocks: refused as in ARC traces
        raise _bad_line(path, text.splitlines(), _check_lirs_line)
    return keys, len(tokens)


def _check_arc_line(line: str) -> str:
    words = line.split()
    if not words:
        return ""
    if len(words) != 4:
        return "expected 'start count ignore reqno'"
    try:
        values = [int(w) for w in words]
    except ValueError:
        return "expected four integers"
    if values[1] < 0 or values[0] < 0:
        return "negative start or count"
    if any(not -INT64_MAX - 1 <= v <= INT64_MAX for v in values) or values[0] + max(values[1] - 1, 0) > INT64_MAX:
        return f"block numbers larger than {INT64_MAX} (int64)"
    return ""


def expand_runs(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenate ``arange(start, start+count)`` for every run, vectorised."""
    total = float(counts.sum(dtype=np.float64))  # a float sum cannot wrap around as int64 would
    if total > MAX_PAGE_REQUESTS:
        raise TooManyRequests(f"it expands to {total:,.0f} page requests, more than the lab handles "
                              f"({MAX_PAGE_REQUESTS:,}): a corrupt count or size field?")
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    run_of = np.repeat(np.arange(starts.size), counts)
    first_slot = np.cumsum(counts) - counts
    return starts[run_of] + (np.arange(total, dtype=np.int64) - first_slot[run_of])


def parse_arc(path: Path, raw: bytes) -> tuple[np.ndarray, int]:
    text = raw.decode("ascii", errors="replace")
    lines = text.splitlines()
    tokens = text.split()
    try:
        if any(len(line.split()) not in (0, 4) for line in lines):  # every row exactly four fields
            raise ValueError
        table = np.array(tokens, dtype=np.int64).reshape(-1, 4)
        if (table[:, :2] < 0).any():
            raise ValueError
        if (table[:, 0] > INT64_MAX - np.maximum(table[:, 1] - 1, 0)).any():
            raise ValueError  # start+count-1 would wrap around
    except (ValueError, OverflowError):
        raise _bad_line(path, lines, _check_arc_line) from None
    return expand_runs(table[:, 0], table[:, 1]), len(table)


def parse_oracle(path: Path, raw: bytes) -> tuple[np.ndarray, int]:
    whole, rest = divmod(len(raw), ORACLE_RECORD.itemsize)
    if rest:
        raise TraceError(
            f"{path}: record {whole + 1}: truncated ({rest} of {ORACLE_RECORD.itemsize} bytes); "
            "oracleGeneral records are 24 bytes <IQIq"
        )
    records = np.frombuffer(raw, dtype=ORACLE_RECORD, count=whole)
    return records["obj_id"].view(np.int64).copy(), whole


def _pages_of(offsets: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    first = offsets // PAGE_BYTES
    last = (offsets + np.maximum(sizes, 1) - 1) // PAGE_BYTES
    return expand_runs(first, last - first + 1)


def parse_cloudphysics(path: Path, raw: bytes, include_writes: bool) -> tuple[np.ndarray, int]:
    lines = raw.decode("ascii", errors="replace").splitlines()
    if not lines or not lines[0].strip().lower().startswith("version,time,op,size,lbn"):
        raise TraceError(f"{path}: line 1: expected the header 'version,time,op,size,lbn'")
    ops: list[int] = []
    sizes: list[int] = []
    lbns: list[int] = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split(",")
        try:
            if len(fields) != 5:
                raise ValueError
            op, size, lbn = int(fields[2], 16), int(fields[3]), int(fields[4])
            if size < 0 or lbn < 0:
                raise ValueError
        except ValueError:
            raise TraceError(f"{path}: line {number}: expected version,time,op(hex),size,lbn: {line[:60]!r}") from None
        if lbn * SECTOR_BYTES + size > INT64_MAX or op > INT64_MAX:
            raise TraceError(f"{path}: line {number}: lbn, size or op too large (byte offsets must fit int64): "
                             f"{line[:60]!r}")
        ops.append(op)
        sizes.append(size)
        lbns.append(lbn)
    op_arr = np.array(ops, dtype=np.int64)
    keep = np.ones(op_arr.size, dtype=bool) if include_writes else np.isin(op_arr, SCSI_READS)
    offsets = np.array(lbns, dtype=np.int64)[keep] * SECTOR_BYTES
    return _pages_of(offsets, np.array(sizes, dtype=np.int64)[keep]), int(keep.sum())


# SCSI READ(6), READ(10), READ(12), READ(16)
SCSI_READS = np.array([0x08, 0x28, 0xA8, 0x88], dtype=np.int64)


def parse_msr(path: Path, raw: bytes, include_writes: bool) -> tuple[np.ndarray, int]:
    lines = raw.decode("ascii", errors="replace").splitlines()
    devices: dict[tuple[str, str], int] = {}
    dev_ids: list[int] = []
    offsets: list[int] = []
    sizes: list[int] = []
    records = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split(",")
        if number == 1 and len(fields) == 7 and fields[3].strip().lower() == "type":
            continue  # a header line
        try:
            if len(fields) != 7:
                raise ValueError
            kind = fields[3].strip().lower()
            if kind not in ("read", "write"):
                raise ValueError
            offset, size = int(fields[4]), int(fields[5])
            if offset < 0 or size < 0:
                raise ValueError
        except ValueError:
            raise TraceError(
                f"{path}: line {number}: expected Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime: "
                f"{line[:60]!r}"
            ) from None
        if offset + size >= PAGE_BYTES << MSR_PAGE_BITS:
            raise TraceError(f"{path}: line {number}: offset + size beyond {PAGE_BYTES << MSR_PAGE_BITS} bytes "
                             f"(4 PiB per disk): {line[:60]!r}")
        if kind == "write" and not include_writes:
            continue
        records += 1
        device = devices.setdefault((fields[1].strip(), fields[2].strip()), len(devices))
        dev_ids.append(device)
        offsets.append(offset)
        sizes.append(size)
    off = np.array(offsets, dtype=np.int64)
    size_arr = np.array(sizes, dtype=np.int64)
    first = off // PAGE_BYTES
    counts = (off + np.maximum(size_arr, 1) - 1) // PAGE_BYTES - first + 1
    pages = expand_runs(first, counts)
    device_of_page = np.repeat(np.array(dev_ids, dtype=np.int64), counts)
    return (device_of_page << MSR_PAGE_BITS) | pages, records


# --- entry point ------------------------------------------------------------------------------


def load_trace(path: str | Path, fmt: str | None = None, *, include_writes: bool = False) -> Trace:
    """Load a trace file (any supported format and compression) as a ``Trace``."""
    path = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise TraceError(f"{path}: unknown trace format {fmt!r} (choose from {', '.join(FORMATS)})")
    if path.is_dir():
        raise TraceError(f"{path}: is a directory, not a trace file")
    if not path.exists():
        raise TraceError(f"{path}: no such trace file")
    raw = read_bytes(path)
    fmt = fmt or detect_format(path, raw)
    try:
        if fmt == "lirs":
            keys, records = parse_lirs(path, raw)
        elif fmt == "arc":
            keys, records = parse_arc(path, raw)
        elif fmt == "oracle":
            keys, records = parse_oracle(path, raw)
        elif fmt == "cloudphysics":
            keys, records = parse_cloudphysics(path, raw, include_writes)
        else:
            keys, records = parse_msr(path, raw, include_writes)
    except TooManyRequests as exc:
        raise TraceError(f"{path}: {exc}") from None
    except MemoryError:  # numpy's allocation failed below the cap: say so in one line
        raise TraceError(f"{path}: not enough memory to hold its page requests") from None
    if keys.size == 0:
        raise TraceError(f"{path}: the trace holds no (read) requests")
    return Trace(trace_name(path), keys, fmt, records)


def synthetic_zipf(requests: int, keys: int, alpha: float = 0.9, seed: int = 1) -> Trace:
    """A seeded Zipf(alpha) trace over ``keys`` distinct pages (popularity rank shuffled)."""
    if requests <= 0 or keys <= 0:
        raise ValueError("synthetic trace needs requests > 0 and keys > 0")
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, keys + 1, dtype=np.float64) ** alpha
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    ranks = np.minimum(np.searchsorted(cdf, rng.random(requests)), keys - 1)
    names = rng.permutation(keys).astype(np.int64)
    return Trace(f"zipf-{alpha}-{keys}", names[ranks], "synthetic", requests)


def shared_traces_dir() -> Path | None:
    """The shared real-trace folder (env TMEM_TRACES, else ``../shared/traces`` beside the repo)."""
    import os

    env = os.environ.get("TMEM_TRACES")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / ".." / "shared" / "traces")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    return None
