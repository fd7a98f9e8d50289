"""PageIO over real backing files: exact bytes, EOF, write-through coherence, external changes, races."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import guestfs.pageio as pageio_module
from guestfs.cleancache import CleanCache
from guestfs.filekey import FileKey, key_for_fd
from guestfs.pageio import PageIO
from guestfs.transport import InProcessTransport, MockTransport, Transport

PAGE = 4096
RACY_NS = pageio_module.RACY_NS  # the real window (tests/guestfs/conftest.py sets it to 0 per test)


def real_or_mock(kind: str) -> Transport:
    if kind == "mock":
        return MockTransport()
    tmemcore = pytest.importorskip("tmemcore")
    if not hasattr(tmemcore, "Tmem"):
        pytest.skip("tmemcore.Tmem has not landed yet")
    return InProcessTransport(tmemcore.Tmem(memory_pages=64))


@pytest.fixture(params=["mock", "real"])
def pio(request: pytest.FixtureRequest) -> Iterator[PageIO]:
    cc = CleanCache(real_or_mock(request.param))
    cc.init_fs()
    io = PageIO(2, cc)  # tiny first-chance cache: most re-reads go through tmem
    yield io
    io.check()
    io.close()


class Backing:
    def __init__(self, path: Path, data: bytes) -> None:
        path.write_bytes(data)
        self.path = path
        self.fd = os.open(path, os.O_RDWR)
        self.key = key_for_fd(self.fd)

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def backing(tmp_path: Path) -> Iterator[Backing]:
    b = Backing(tmp_path / "f", os.urandom(5 * PAGE + 100))
    yield b
    b.close()


def test_reads_return_the_file_bytes_from_every_layer(pio: PageIO, backing: Backing) -> None:
    data = backing.path.read_bytes()
    for _ in range(3):
        assert pio.read(backing.key, backing.fd, 0, 1 << 20) == data
        for i in range(6):
            assert pio.read(backing.key, backing.fd, i * PAGE + 7, 5000) == data[i * PAGE + 7 : i * PAGE + 5007]
        pio.check()
    s = pio.stats()
    assert s["succ_gets"] > 0 and s["page_cache_hits"] > 0
    assert s["backing_bytes_read"] == len(data)  # everything after the first pass came from the caches
    assert s["keys_handle"] == 1


def test_never_returns_bytes_past_eof(pio: PageIO, backing: Backing) -> None:
    size = 5 * PAGE + 100
    assert pio.read(backing.key, backing.fd, size - 10, 100) == backing.path.read_bytes()[-10:]
    assert pio.read(backing.key, backing.fd, size, 100) == b""
    assert pio.read(backing.key, backing.fd, size + PAGE, 100) == b""
    pio.read(backing.key, backing.fd, 0, 1 << 20)  # the partial last page goes to tmem zero-padded
    pio.read(backing.key, backing.fd, 0, PAGE)
    assert pio.read(backing.key, backing.fd, 5 * PAGE, PAGE) == backing.path.read_bytes()[5 * PAGE :]


def test_write_through_is_coherent_across_layers(pio: PageIO, backing: Backing) -> None:
    data = bytearray(backing.path.read_bytes())
    pio.read(backing.key, backing.fd, 0, 1 << 20)  # pages spread over first-chance and tmem
    assert pio.write(backing.key, backing.fd, b"X" * 10, PAGE - 5) == 10
    data[PAGE - 5 : PAGE + 5] = b"X" * 10
    assert pio.read(backing.key, backing.fd, 0, 1 << 20) == data
    assert backing.path.read_bytes() == data
    pio.check()


def test_write_past_eof_extends_and_old_last_page_is_refreshed(pio: PageIO, backing: Backing) -> None:
    data = backing.path.read_bytes()
    pio.read(backing.key, backing.fd, 0, 1 << 20)
    pio.write(backing.key, backing.fd, b"tail", 8 * PAGE)
    expected = data + bytes(8 * PAGE - len(data)) + b"tail"
    assert pio.read(backing.key, backing.fd, 0, 1 << 20) == expected


def test_append_lands_at_the_real_end_and_drops_what_it_touched(pio: PageIO, backing: Backing) -> None:
    """An O_APPEND descriptor: the kernel's offset may be stale (another hard-link name, a writer behind
    the mount); the bytes go to the real end and the pages from the old end on are dropped."""
    pio.read(backing.key, backing.fd, 0, 1 << 20)  # the partial last page is cached short
    with open(backing.path, "ab") as behind:  # grows behind the cache, then our append comes
        behind.write(b"B" * 300)
    appender = os.open(backing.path, os.O_WRONLY | os.O_APPEND)
    try:
        assert pio.write(backing.key, appender, b"A" * 50, 7, append=True) == 50  # offset 7 is stale: ignored
    finally:
        os.close(appender)
    assert pio.read(backing.key, backing.fd, 0, 1 << 20) == backing.path.read_bytes()
    assert backing.path.read_bytes().endswith(b"B" * 300 + b"A" * 50)
    pio.check()


def test_truncate_drops_the_file(pio: PageIO, backing: Backing) -> None:
    pio.read(backing.key, backing.fd, 0, 1 << 20)
    os.ftruncate(backing.fd, PAGE + 1)
    pio.truncate(backing.key, PAGE + 1)
    assert pio.stats()["tracked_pages"] == 0 and pio.stats()["page_cache_pages"] == 0
    assert pio.read(backing.key, backing.fd, 0, 1 << 20) == backing.path.read_bytes()
    assert pio.stats()["revalidate_drops"] == 0


def test_external_change_is_detected(pio: PageIO, backing: Backing) -> None:
    pio.read(backing.key, backing.fd, 0, 1 << 20)
    new = os.urandom(5 * PAGE + 100)
    with open(backing.path, "r+b") as f:  # same size, behind the mount
        f.write(new)
    os.utime(backing.path, ns=(1, 1))  # a distinct mtime even within one clock tick
    assert pio.read(backing.key, backing.fd, 0, 1 << 20) == new
    assert pio.stats()["revalidate_drops"] == 1


def test_revalidate_on_open_drops_changed_file(pio: PageIO, backing: Backing) -> None:
    pio.read(backing.key, backing.fd, 0, 1 << 20)
    os.truncate(backing.path, 10)
    pio.revalidate(backing.key, os.stat(backing.path))
    assert pio.stats()["tracked_pages"] == 0 and pio.stats()["page_cache_pages"] == 0


def test_forget_releases_everything(pio: PageIO, backing: Backing) -> None:
    pio.read(backing.key, backing.fd, 0, 1 << 20)
    pio.forget(backing.key)
    s = pio.stats()
    assert s["files"] == 0 and s["tracked_objects"] == 0 and s["page_cache_pages"] == 0


def test_read_racing_a_write_never_caches_old_bytes(
    pio: PageIO, backing: Backing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader's pread returns the old bytes; a write lands before it inserts them."""
    old = backing.path.read_bytes()
    real_pread = pageio_module.pread_full

    def pread_then_concurrent_write(fd: int, count: int, offset: int) -> bytes:
        data = real_pread(fd, count, offset)
        monkeypatch.setattr(pageio_module, "pread_full", real_pread)
        pio.write(backing.key, backing.fd, b"N" * PAGE, 0)
        return data

    monkeypatch.setattr(pageio_module, "pread_full", pread_then_concurrent_write)
    assert pio.read(backing.key, backing.fd, 0, PAGE) == old[:PAGE]  # linearised before the write
    assert pio.stats()["stale_inserts_refused"] == 1
    assert pio.read(backing.key, backing.fd, 0, PAGE) == b"N" * PAGE


def test_pages_read_while_an_external_write_may_still_be_copying_are_not_cached(
    pio: PageIO, backing: Backing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """write(2) stamps ctime/mtime before it copies: a read in between sees the new stamps and the
    old bytes. Cached, those old bytes would validate for good (an audit saw this through a mount)."""
    monkeypatch.setattr(pageio_module, "RACY_NS", RACY_NS)
    old = backing.path.read_bytes()
    os.pwrite(backing.fd, b"N" * PAGE, 0)  # another process's write, stamps and bytes now in
    real_pread = pageio_module.pread_full

    def pread_before_the_copy_landed(fd: int, count: int, offset: int) -> bytes:
        monkeypatch.setattr(pageio_module, "pread_full", real_pread)
        return old[offset : offset + count]  # what a read racing that write's copy returns

    monkeypatch.setattr(pageio_module, "pread_full", pread_before_the_copy_landed)
    assert pio.read(backing.key, backing.fd, 0, PAGE) == old[:PAGE]  # linearised before the write
    assert pio.stats()["racy_pages_not_cached"] == 1
    assert pio.read(backing.key, backing.fd, 0, PAGE) == b"N" * PAGE  # was old[:PAGE], for good


def test_own_writes_and_settled_files_are_cached_at_once(
    pio: PageIO, backing: Backing, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pageio_module, "RACY_NS", RACY_NS)
    pio.write(backing.key, backing.fd, b"W" * PAGE, 0)  # our pwrite returned before its stamp was recorded
    for _ in range(2):
        assert pio.read(backing.key, backing.fd, 0, PAGE) == b"W" * PAGE
    assert pio.stats()["page_cache_hits"] == 1 and pio.stats()["racy_pages_not_cached"] == 0
    os.pwrite(backing.fd, b"X" * PAGE, PAGE)  # an external change: not cached until it settles
    assert pio.read(backing.key, backing.fd, PAGE, PAGE) == b"X" * PAGE
    assert pio.stats()["racy_pages_not_cached"] == 1
    pageio_module.wait_until_cacheable(backing.path)
    for _ in range(2):
        assert pio.read(backing.key, backing.fd, PAGE, PAGE) == b"X" * PAGE
    assert pio.stats()["page_cache_hits"] == 2 and pio.stats()["racy_pages_not_cached"] == 1


def test_bad_arguments(pio: PageIO, backing: Backing) -> None:
    with pytest.raises(ValueError, match="offset >= 0"):
        pio.read(backing.key, backing.fd, -1, 10)
    with pytest.raises(ValueError, match="offset >= 0"):
        pio.write(backing.key, backing.fd, b"x", -1)
    assert backing.path.stat().st_size == 5 * PAGE + 100


def test_synthetic_key_works_with_any_fd(pio: PageIO, backing: Backing) -> None:
    k = FileKey(oid=99, source="synthetic", ino=99)
    assert pio.read(k, backing.fd, 0, 10) == backing.path.read_bytes()[:10]
    assert pio.stats()["keys_synthetic"] == 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(["read", "write", "truncate"]), st.integers(0, 7 * PAGE), st.integers(0, 3 * PAGE)),
        max_size=25,
    )
)
def test_random_ops_match_a_plain_file(tmp_path: Path, steps: list[tuple[str, int, int]]) -> None:
    cc = CleanCache(MockTransport())
    cc.init_fs()
    io = PageIO(2, cc)
    b = Backing(tmp_path / "model", b"")
    model = bytearray()
    try:
        for op, offset, size in steps:
            if op == "read":
                assert io.read(b.key, b.fd, offset, size) == bytes(model[offset : offset + size])
            elif op == "write":
                data = os.urandom(size)
                io.write(b.key, b.fd, data, offset)
                if data and offset > len(model):  # an empty pwrite does not extend the file
                    model.extend(bytes(offset - len(model)))
                model[offset : offset + size] = data
            else:
                os.ftruncate(b.fd, offset)
                io.truncate(b.key, offset)
                del model[offset:]
                model.extend(bytes(offset - len(model)))
            io.check()
    finally:
        b.close()
        io.close()


@pytest.mark.timeout(60)
def test_concurrent_readers_and_writer_leave_no_stale_pages(tmp_path: Path) -> None:
    """After racing reads and writes stop, every cached page equals the file."""
    import threading

    cc = CleanCache(MockTransport())
    cc.init_fs()
    io = PageIO(3, cc)
    b = Backing(tmp_path / "race", bytes(8 * PAGE))
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                for index in range(8):
                    assert len(io.read(b.key, b.fd, index * PAGE, PAGE)) == PAGE
        except BaseException as exc:  # reported to the main thread below
            errors.append(exc)
            raise

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for version in range(1, 150):
            index = version % 8
            io.write(b.key, b.fd, bytes([version % 251]) * PAGE, index * PAGE)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not errors
    io.check()
    assert io.read(b.key, b.fd, 0, 8 * PAGE) == b.path.read_bytes()
    for _ in range(2):  # and again via tmem / first-chance
        assert io.read(b.key, b.fd, 0, 8 * PAGE) == b.path.read_bytes()
    b.close()
    io.close()


def test_sequential_reader_gets_read_ahead(tmp_path: Path) -> None:
    cc = CleanCache(MockTransport())
    cc.init_fs()
    io = PageIO(64, cc, readahead_pages=8)
    b = Backing(tmp_path / "seq", os.urandom(40 * PAGE + 5))
    data = b.path.read_bytes()
    try:
        got = b"".join(io.read(b.key, b.fd, off, PAGE) for off in range(0, len(data), PAGE))
        assert got == data
        s = io.stats()
        # 41 pages: page 0 is not yet sequential; misses at 1, 10, 19, 28 read 8 ahead, 37 only 3 (EOF)
        assert s["readahead_loaded"] == 4 * 8 + 3
        assert s["backing_reads"] == 6 and s["backing_bytes_read"] == len(data)
        io.read(b.key, b.fd, 20 * PAGE, PAGE)  # random access: no read-ahead
        io.check()
    finally:
        b.close()
        io.close()


def test_no_read_ahead_into_a_tiny_cache(pio: PageIO, backing: Backing) -> None:
    assert pio.readahead_pages == 0
    for off in range(0, 5 * PAGE, PAGE):
        pio.read(backing.key, backing.fd, off, PAGE)
    assert pio.stats()["readahead_loaded"] == 0


def test_file_states_are_pruned_when_they_guard_no_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading many files once must not grow the per-file table without bound: a state whose file has
    no page cached and none tracked in tmem is dropped at the next prune; the others stay, and the
    bytes stay right for every file."""
    monkeypatch.setattr(pageio_module, "PRUNE_FILES_MIN", 16)
    cc = CleanCache(InProcessTransport(pytest.importorskip("tmemcore").Tmem(memory_pages=8)), max_tracked_pages=8)
    cc.init_fs()
    io = PageIO(4, cc)
    contents = {}
    try:
        for n in range(200):
            path = tmp_path / f"f{n}"
            contents[n] = os.urandom(PAGE)
            path.write_bytes(contents[n])
            fd = os.open(path, os.O_RDONLY)
            try:
                assert io.read(key_for_fd(fd), fd, 0, PAGE) == contents[n]
            finally:
                os.close(fd)
            io.check()  # every cached or tracked page still has its file's state
        files = io.stats()["files"]
        assert files <= 2 * (16 + 4 + 8) and files == sum(v for k, v in io.stats().items() if k.startswith("keys_"))
        for n in (0, 199):  # re-reading an old (pruned) and a recent file still returns its bytes
            fd = os.open(tmp_path / f"f{n}", os.O_RDONLY)
            try:
                assert io.read(key_for_fd(fd), fd, 0, PAGE) == contents[n]
            finally:
                os.close(fd)
    finally:
        io.close()


def test_a_write_cut_short_by_an_error_reports_what_landed(
        pio: PageIO, backing: Backing, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC after a short write: return the bytes written (as write(2)) and drop what they touched."""
    pio.read(backing.key, backing.fd, 0, 1 << 20)  # cached
    real_pwrite = os.pwrite
    calls = []

    def one_page_then_full(fd: int, data: bytes, offset: int) -> int:
        calls.append(offset)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, bytes(data[:PAGE]), offset)

    monkeypatch.setattr(pageio_module.os, "pwrite", one_page_then_full)
    assert pio.write(backing.key, backing.fd, b"N" * (2 * PAGE), 0) == PAGE
    assert backing.path.read_bytes()[:PAGE] == b"N" * PAGE
    assert pio.read(backing.key, backing.fd, 0, 2 * PAGE) == backing.path.read_bytes()[: 2 * PAGE]
    with pytest.raises(OSError) as nothing_landed:  # the next write: nothing lands, the error itself
        pio.write(backing.key, backing.fd, b"M" * PAGE, 0)
    assert nothing_landed.value.errno == errno.ENOSPC


def test_a_ctime_ahead_of_our_clock_is_not_settled(
    pio: PageIO, backing: Backing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clock stepped back (or a backing file system running ahead) must not make a just-changed
    file look settled: abs(now - ctime) did, and cached pages a write may still have been copying."""
    monkeypatch.setattr(pageio_module, "RACY_NS", RACY_NS)
    os.pwrite(backing.fd, b"N" * PAGE, 0)  # an external change, stamped now
    behind = pageio_module.time.time_ns() - 10 * RACY_NS
    monkeypatch.setattr(pageio_module.time, "time_ns", lambda: behind)  # our clock 10 s behind that stamp
    assert pio.read(backing.key, backing.fd, 0, PAGE) == b"N" * PAGE
    assert pio.stats()["racy_pages_not_cached"] == 1
