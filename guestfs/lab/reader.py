"""The lab's reader process: a seeded list of 4 KiB preads, every page checked, timed by itself.

Run as a script (``python -I reader.py SPEC.json``) so that it imports nothing but the standard
library (and xxhash in digest mode): it runs inside the guest's memory cgroup (``guestmem``),
where every byte of its own memory is guest memory the page cache cannot have. The lab writes
SPEC (``write_spec``) and reads one JSON line from stdout (``ReaderResult``).

SPEC names a root directory, its files, a sequence file (``array('I')``: file number, page
index, file number, page index, ...) and how to check a page:

* ``derived``: the page's bytes are ``page_bytes(file_no, index)`` (the value table's files are
  written so), checked without a second read;
* ``digests``: xxh64 of each page of each file, from a ``array('Q')`` file (the lab computed them
  from the backing files beforehand), for trees whose content is not derived.

``direct`` opens the files with O_DIRECT (reads into a page-aligned buffer): the no-cache
baseline. Every file gets POSIX_FADV_RANDOM for the timed reads, as fio does for random reads:
the kernel reads only the pages asked for, so caches hold what the sequence touched, not
read-ahead.

``warmup``: before the timed reads, one sequential pass over every file in 128 KiB reads (checked
too, timed apart) -- a guest that has been running a while has read its working set before, so
the timed reads see the caches in their steady state, not the first touch of every page. The
reader then prints ``{"phase": "warm", ...}`` and waits for a line on stdin, so that the lab can
read the counters between the two phases; the timed reads' result is the last line.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
import time
from array import array
from typing import Any

PAGE_BYTES = 4096
PAGE_MAGIC = 0x746D656D67756573  # "tmemgues": keeps a derived page from looking like zeros or text
CHECKPOINTS = 10  # elapsed time is also reported after each tenth of the reads
WARMUP_CHUNK = 32 * PAGE_BYTES  # FUSE's largest read request (max_read 128 KiB)


def page_bytes(file_no: int, index: int) -> bytes:
    """The content of page ``index`` of file ``file_no`` in a derived tree: its 16-byte tag, repeated."""
    return struct.pack("<QQ", PAGE_MAGIC ^ file_no, index) * (PAGE_BYTES // 16)


def write_spec(path: str, spec: dict[str, Any]) -> str:
    """Write SPEC for ``main`` (keys: root, files, sequence, check, direct; digests for that check)."""
    with open(path, "w") as out:
        json.dump(spec, out)
    return path


def write_sequence(path: str, reads: list[tuple[int, int]]) -> str:
    """The (file number, page index) reads as the ``array('I')`` file the reader loads."""
    flat = array("I")
    for file_no, index in reads:
        flat.append(file_no)
        flat.append(index)
    with open(path, "wb") as out:
        flat.tofile(out)
    return path


def _load_array(path: str, typecode: str) -> array:
    values = array(typecode)
    with open(path, "rb") as source:
        values.frombytes(source.read())
    return values


def _open_all(root: str, files: list[str], direct: bool, advice: int) -> list[int]:
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fds = []
    for name in files:
        fd = os.open(os.path.join(root, name), flags)
        os.posix_fadvise(fd, 0, 0, advice)
        fds.append(fd)
    return fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def warmup(spec: dict[str, Any]) -> dict[str, Any]:
    """One sequential pass over every file (128 KiB reads), every page checked; timed."""
    check = _checker(spec)
    fds = _open_all(spec["root"], spec["files"], bool(spec.get("direct")), os.POSIX_FADV_SEQUENTIAL)
    buffer = mmap.mmap(-1, WARMUP_CHUNK)
    view = [memoryview(buffer)]
    pages = wrong = 0
    started = time.perf_counter()
    try:
        for file_no, fd in enumerate(fds):
            offset = 0
            while True:
                got = os.preadv(fd, view, offset)
                for start in range(0, got, PAGE_BYTES):
                    pages += 1
                    if not check(file_no, (offset + start) // PAGE_BYTES, buffer[start:min(got, start + PAGE_BYTES)]):
                        wrong += 1
                if got < WARMUP_CHUNK:
                    break
                offset += got
        seconds = time.perf_counter() - started
    finally:
        _close_all(fds)
    return {"phase": "warm", "pages": pages, "wrong_reads": wrong, "seconds": seconds}


def _checker(spec: dict[str, Any]) -> Any:
    """A function (file_no, index, data) -> True when ``data`` is that page's right content."""
    if spec["check"] == "derived":
        pack, magic, repeat = struct.Struct("<QQ").pack, PAGE_MAGIC, PAGE_BYTES // 16
        return lambda file_no, index, data: data == pack(magic ^ file_no, index) * repeat
    import xxhash

    digests = _load_array(spec["digests"], "Q")
    first_page = spec["first_page"]  # file_no -> number of its first page in ``digests``
    digest = xxhash.xxh64_intdigest
    return lambda file_no, index, data: digest(data) == digests[first_page[file_no] + index]


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Execute the sequence; returns counts and timings (the sequence's reading only is timed)."""
    sequence = _load_array(spec["sequence"], "I")
    check = _checker(spec)
    fds = _open_all(spec["root"], spec["files"], bool(spec.get("direct")), os.POSIX_FADV_RANDOM)
    buffer = mmap.mmap(-1, PAGE_BYTES)  # page-aligned, as O_DIRECT needs
    view = [memoryview(buffer)]
    reads = len(sequence) // 2
    # the read counts after which each tenth ends (the last one: all reads)
    marks = [max(1, reads * k // CHECKPOINTS) for k in range(1, CHECKPOINTS + 1)]
    checkpoints: list[float] = []
    next_mark = 0
    wrong = short = 0
    preadv = os.preadv
    started = time.perf_counter()
    try:
        for number in range(reads):
            file_no, index = sequence[2 * number], sequence[2 * number + 1]
            got = preadv(fds[file_no], view, index * PAGE_BYTES)
            if got < PAGE_BYTES and spec["check"] == "derived":
                short += 1  # derived files are whole pages: a short read is a wrong read
            if not check(file_no, index, buffer[:got]):
                wrong += 1
            while next_mark < CHECKPOINTS and number + 1 == marks[next_mark]:
                checkpoints.append(time.perf_counter() - started)
                next_mark += 1
        seconds = time.perf_counter() - started
    finally:
        _close_all(fds)
    return {"phase": "timed", "reads": reads, "wrong_reads": wrong, "short_reads": short, "seconds": seconds,
            "checkpoint_reads": marks, "checkpoints": checkpoints, **_own_memory(), "memory_cgroup": _memory_cgroup()}


def _own_memory() -> dict[str, int]:
    """The reader's anonymous memory now and its peak resident set (guest memory the cache cannot use)."""
    wanted = {"RssAnon": "anon_bytes", "VmHWM": "peak_rss_bytes"}
    found = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in wanted:
                found[wanted[name]] = int(value.split()[0]) * 1024  # "   4920 kB"
    return found


def _memory_cgroup() -> str:
    """This process's memory cgroup, as /proc/self/cgroup names it (v1 memory line, else v2's)."""
    with open("/proc/self/cgroup") as table:
        lines = [line.rstrip("\n").split(":", 2) for line in table]
    for _, controllers, path in lines:
        if "memory" in controllers.split(","):
            return path
    return next((path for hierarchy, _, path in lines if hierarchy == "0"), "")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: reader.py SPEC.json", file=sys.stderr)
        return 2
    with open(argv[0]) as source:
        spec = json.load(source)
    try:
        if spec.get("warmup"):
            print(json.dumps(warmup(spec)), flush=True)
            if sys.stdin.readline().strip() != "go":  # the lab went away: nothing to time for it
                return 1
        result = run(spec)
    except OSError as exc:
        print(f"reader: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
