"""--first-chance kernel without FUSE: CleanCache over a shared pool (non-exclusive gets), PageIO with
the KernelFirstChance (tmem inclusive), ``PageIO.kernel_open``'s keep/drop/direct decisions, and
``--backing-direct``'s page-aligned reads. (Real mounts: tests/mount/test_kernel_first_chance.py.)

tests/guestfs/conftest.py sets RACY_NS to 0, so ``settle_ns`` is ``attr_timeout`` here: attr_timeout=0
makes every file settled at once, 1 s makes a file just written "just changed".
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import guestfs.pageio as pageio_module
from guestfs.cleancache import CleanCache
from guestfs.filekey import FileKey, key_for_fd
from guestfs.pagecache import KernelFirstChance
from guestfs.pageio import PageIO, pread_direct, pread_full
from guestfs.stack import Stack, StackConfig, build_stack
from guestfs.transport import InProcessTransport, MockTransport

tmemcore = pytest.importorskip("tmemcore")

PAGE = 4096
UUID = (0x1234, 0x5678)
KEEP, DROP, DIRECT = (False, True), (False, False), (True, False)  # kernel_open's (direct_io, keep_cache)
COARSE_TIMESTAMPS = tuple(int(part) for part in os.uname().release.split(".")[:2]) < (6, 13)


def key(oid: int) -> FileKey:
    return FileKey(oid=oid, source="synthetic", ino=oid)


def page(tag: int) -> bytes:
    return tag.to_bytes(8, "little") * (PAGE // 8)


def shared_cleancache(host_pages: int = 64) -> tuple[CleanCache, object]:
    host = tmemcore.Tmem(memory_pages=host_pages)
    cc = CleanCache(InProcessTransport(host), shared_uuid=UUID)
    cc.init_fs()
    return cc, host


# -- CleanCache over a shared pool ------------------------------------------------------------------------


def test_shared_pool_hits_leave_the_page_in_the_host() -> None:
    cc, host = shared_cleancache()
    assert not cc.exclusive_gets and cc.stats()["exclusive_gets"] is False
    pool = host.clients[1].pools[cc.stats()["pool_id"]]
    assert pool.shared and pool.uuid == UUID  # the host made the pool this uuid's shared pool
    cc.put_page(key(5), 3, page(1))
    for _ in range(3):
        assert cc.get_page(key(5), 3) == page(1)
        cc.check()
    assert cc.get_pages(key(5), [3, 4, 3]) == [page(1), None, page(1)]  # the run path keeps them too
    s = cc.stats()
    assert (s["succ_gets"], s["failed_gets"], s["tracked_pages"]) == (5, 1, 1), s
    assert cc.holds(key(5), 3)
    cc.invalidate_page(key(5), 3)  # a flush still removes it
    assert cc.get_page(key(5), 3) is None and not cc.holds(key(5), 3)
    cc.check()


def test_private_pool_gets_stay_exclusive() -> None:
    cc = CleanCache(InProcessTransport(tmemcore.Tmem(memory_pages=16)))
    cc.init_fs()
    assert cc.exclusive_gets
    cc.put_page(key(1), 0, page(1))
    assert cc.get_page(key(1), 0) == page(1)
    assert cc.get_page(key(1), 0) is None


def test_a_shared_get_that_misses_untracks_the_page() -> None:
    """A miss means the host dropped the page: forget it, so later gets are skipped (not sent)."""
    transport = MockTransport()  # a host whose gets remove the page: the second get misses
    cc = CleanCache(transport, shared_uuid=UUID)
    cc.init_fs()
    cc.put_pages(key(7), [(0, page(0)), (1, page(1))])
    assert cc.get_page(key(7), 0) == page(0)
    assert cc.holds(key(7), 0)  # a hit of a shared pool stays tracked
    assert cc.get_page(key(7), 0) is None  # the host had dropped it after all
    assert not cc.holds(key(7), 0) and cc.holds(key(7), 1)
    cc.check()
    assert cc.get_page(key(7), 0) is None  # now skipped: no GET_PAGE sent
    assert transport.ops["GET_PAGE"] == 2 and cc.stats()["gets_skipped"] == 1
    assert cc.get_pages(key(7), [1, 1]) == [page(1), None]
    s = cc.stats()
    assert s["tracked_pages"] == 0 and s["tracked_objects"] == 0, s
    cc.check()


def test_shared_gets_under_host_evictions_track_a_superset_of_the_host() -> None:
    cc, host = shared_cleancache(host_pages=4)
    pages = [(index, page(index)) for index in range(20)]
    cc.put_pages(key(3), pages)
    got = cc.get_pages(key(3), list(range(20)))
    hits = [index for index, data in enumerate(got) if data is not None]
    assert 0 < len(hits) <= 4 and all(got[index] == page(index) for index in hits)
    assert cc.stats()["tracked_pages"] == len(hits)  # every miss untracked, every hit kept
    assert cc.get_pages(key(3), hits) == [page(index) for index in hits]  # and still there
    cc.check()


def test_a_transport_failure_in_a_shared_get_is_a_miss_and_switches_off() -> None:
    transport = MockTransport(fail_after=3)  # NEW_POOL, PUT, GET work; the next call fails
    cc = CleanCache(transport, shared_uuid=UUID)
    cc.init_fs()
    cc.put_page(key(1), 0, page(1))
    assert cc.get_page(key(1), 0) == page(1)
    assert cc.get_page(key(1), 0) is None
    assert cc.stats()["transport_errors"] == 1 and cc.mode == "passthrough"
    cc.check()


# -- PageIO with the kernel first chance ----------------------------------------------------------------


@pytest.fixture
def kernel_stack() -> Iterator[Stack]:
    stack = build_stack(StackConfig(tmem_pages=64, first_chance="kernel", attr_timeout=0.0))
    yield stack
    stack.check()
    stack.close()


class Backing:
    def __init__(self, path: Path, data: bytes, flags: int = os.O_RDWR) -> None:
        path.write_bytes(data)
        self.path = path
        self.fd = os.open(path, flags)
        self.key = key_for_fd(self.fd)

    def stat(self) -> os.stat_result:
        return os.fstat(self.fd)

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def backing(tmp_path: Path) -> Iterator[Backing]:
    b = Backing(tmp_path / "f", os.urandom(5 * PAGE + 100))
    yield b
    b.close()


def change_behind(b: Backing, data: bytes, offset: int = 0) -> None:
    """Another process's write (its own descriptor), with a distinct mtime on coarse clocks."""
    fd = os.open(b.path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        if COARSE_TIMESTAMPS:
            os.utime(fd, ns=(0, os.fstat(fd).st_mtime_ns + 1))
    finally:
        os.close(fd)


def test_build_stack_makes_a_kernel_first_chance_over_a_shared_pool(kernel_stack: Stack) -> None:
    pio = kernel_stack.pageio
    assert isinstance(pio.cache, KernelFirstChance) and pio.first_chance == "kernel"
    assert not pio.cleancache.exclusive_gets and pio.cleancache.shared_uuid not in (None, (0, 0))
    assert pio.readahead_pages == 0  # the kernel reads ahead itself
    other = build_stack(StackConfig(tmem_pages=16, first_chance="kernel"))
    try:  # every stack's pool gets its own fresh uuid: no two guests share by chance
        assert other.cleancache.shared_uuid != pio.cleancache.shared_uuid
    finally:
        other.close()
    daemon = build_stack(StackConfig(page_cache_pages=4, tmem_pages=16))
    try:
        assert daemon.pageio.first_chance == "daemon" and daemon.cleancache.exclusive_gets
    finally:
        daemon.close()


def test_reads_put_every_page_and_rereads_are_tmem_hits(kernel_stack: Stack, backing: Backing) -> None:
    pio = kernel_stack.pageio
    data = backing.path.read_bytes()
    assert pio.read(backing.key, backing.fd, 0, 1 << 20) == data
    s = pio.stats()
    assert (s["puts"], s["tracked_pages"], s["backing_bytes_read"]) == (6, 6, len(data)), s
    assert (s["page_cache_hits"], s["page_cache_pages"], s["page_cache_capacity"]) == (0, 0, 0), s
    for round_number in (1, 2):  # the kernel dropped its pages twice: tmem serves them twice
        assert pio.read(backing.key, backing.fd, 0, 1 << 20) == data
        s = pio.stats()
        assert s["succ_gets"] == 6 * round_number and s["backing_bytes_read"] == len(data), s
    assert pio.read(backing.key, backing.fd, 5 * PAGE + 50, 4096) == data[5 * PAGE + 50:]  # zero-padded in tmem
    assert pio.read(backing.key, backing.fd, 7, 9000) == data[7:9007]
    assert pio.stats()["tracked_pages"] == 6
    pio.check()


def test_sequential_reads_read_no_pages_ahead(kernel_stack: Stack, tmp_path: Path) -> None:
    b = Backing(tmp_path / "seq", os.urandom(40 * PAGE))
    try:
        pio = kernel_stack.pageio
        got = b"".join(pio.read(b.key, b.fd, offset, PAGE) for offset in range(0, 40 * PAGE, PAGE))
        assert got == b.path.read_bytes()
        s = pio.stats()
        assert s["readahead_loaded"] == 0 and s["backing_reads"] == 40 and s["puts"] == 40, s
    finally:
        b.close()


def test_writes_flush_the_touched_pages_from_tmem(kernel_stack: Stack, backing: Backing) -> None:
    pio = kernel_stack.pageio
    data = bytearray(backing.path.read_bytes())
    pio.read(backing.key, backing.fd, 0, 1 << 20)
    assert pio.write(backing.key, backing.fd, b"X" * 10, PAGE - 5) == 10  # pages 0 and 1
    data[PAGE - 5:PAGE + 5] = b"X" * 10
    cc = pio.cleancache
    assert [cc.holds(backing.key, index) for index in range(6)] == [False, False, True, True, True, True]
    before = pio.stats()["backing_bytes_read"]
    assert pio.read(backing.key, backing.fd, 0, 1 << 20) == data
    assert pio.stats()["backing_bytes_read"] == before + 2 * PAGE  # the flushed two, nothing else
    assert all(cc.holds(backing.key, index) for index in range(6))  # our own write's pages: put at once
    pio.write(backing.key, backing.fd, b"tail", 8 * PAGE)  # growth: the old short last page goes too
    assert not cc.holds(backing.key, 5) and cc.holds(backing.key, 4)
    expected = bytes(data) + bytes(8 * PAGE - len(data)) + b"tail"
    for _ in range(2):
        assert pio.read(backing.key, backing.fd, 0, 1 << 20) == expected
    pio.check()


def test_an_external_change_drops_the_tmem_pages(kernel_stack: Stack, backing: Backing) -> None:
    pio = kernel_stack.pageio
    pio.read(backing.key, backing.fd, 0, 1 << 20)
    new = os.urandom(5 * PAGE + 100)
    change_behind(backing, new)
    assert pio.read(backing.key, backing.fd, 0, 1 << 20) == new
    assert pio.read(backing.key, backing.fd, 0, 1 << 20) == new  # the new pages, from tmem now
    s = pio.stats()
    assert s["revalidate_drops"] == 1 and s["succ_gets"] == 6, s


# -- kernel_open ------------------------------------------------------------------------------------------


def test_kernel_open_keeps_only_while_the_validators_are_unchanged(kernel_stack: Stack, backing: Backing) -> None:
    pio = kernel_stack.pageio  # attr_timeout 0: every file is settled
    assert pio.settle_ns == 0
    for writable in (False, True):
        assert pio.kernel_open(backing.key, backing.stat(), writable=writable) == (DROP if not writable else KEEP)
    assert pio.kernel_open(backing.key, backing.stat(), writable=False) == KEEP
    pio.read(backing.key, backing.fd, 0, 1 << 20)  # reads change nothing the kernel holds
    assert pio.kernel_open(backing.key, backing.stat(), writable=False) == KEEP
    assert pio.stats()["tracked_pages"] == 6

    change_behind(backing, b"new")  # the kernel's pages of the file are stale now
    assert pio.kernel_open(backing.key, backing.stat(), writable=False) == DROP
    s = pio.stats()
    assert s["revalidate_drops"] == 1 and s["tracked_pages"] == 0, s  # tmem's old pages went too
    assert pio.kernel_open(backing.key, backing.stat(), writable=False) == KEEP

    os.ftruncate(backing.fd, PAGE)
    pio.truncate(backing.key, PAGE)  # a truncate through the mount: the kernel's copy is not ours to trust
    assert pio.kernel_open(backing.key, backing.stat(), writable=True) == DROP
    pio.invalidate(backing.key)  # e.g. a punched hole
    assert pio.kernel_open(backing.key, backing.stat(), writable=True) == DROP
    assert pio.kernel_open(backing.key, backing.stat(), writable=True) == KEEP
    pio.forget(backing.key)  # unlinked: a file of the same key later is never seen before
    assert pio.kernel_open(backing.key, backing.stat(), writable=False) == DROP


@pytest.fixture
def fresh_stack() -> Iterator[Stack]:
    """attr_timeout 1 s: a file changed behind the mount less than a second ago is "just changed"."""
    stack = build_stack(StackConfig(tmem_pages=64, first_chance="kernel", attr_timeout=1.0))
    yield stack
    stack.check()
    stack.close()


@contextmanager
def clock_ahead(seconds: float) -> Iterator[None]:
    """PageIO's clock ``seconds`` ahead (as if that long had passed), for the ``with`` block only."""
    real = pageio_module.time.time_ns
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pageio_module.time, "time_ns", lambda: real() + int(seconds * 1e9))
        yield


def test_a_just_changed_file_is_direct_read_only_and_dropped_writable(fresh_stack: Stack, backing: Backing) -> None:
    pio = fresh_stack.pageio
    assert pio.settle_ns == 1_000_000_000
    assert pio.kernel_open(backing.key, backing.stat(), writable=False) == DIRECT  # written just now
    assert pio.kernel_open(backing.key, backing.stat(), writable=True) == DROP
    assert pio.kernel_open(backing.key, backing.stat(), writable=False) == DIRECT  # still, until it settles
    with clock_ahead(1.5):
        # settled; but what the kernel cached meanwhile (through the writable open) may be a racing
        # writer's old bytes: dropped once, kept after
        assert pio.kernel_open(backing.key, backing.stat(), writable=False) == DROP
        assert pio.kernel_open(backing.key, backing.stat(), writable=False) == KEEP

    change_behind(backing, b"again", 3 * PAGE)  # changed behind the mount again, just now
    assert pio.kernel_open(backing.key, backing.stat(), writable=False) == DIRECT
    assert pio.kernel_open(backing.key, backing.stat(), writable=True) == DROP


def test_the_settle_time_follows_a_longer_attribute_timeout(backing: Backing) -> None:
    stack = build_stack(StackConfig(tmem_pages=16, first_chance="kernel", attr_timeout=5.0))
    try:
        pio = stack.pageio
        assert pio.settle_ns == 5_000_000_000
        with clock_ahead(3):  # past RACY_NS, within the attribute timeout: the kernel may hold the old size
            assert pio.kernel_open(backing.key, backing.stat(), writable=False) == DIRECT
        with clock_ahead(6):
            assert pio.kernel_open(backing.key, backing.stat(), writable=False) == DROP
    finally:
        stack.close()


def test_our_own_write_keeps_the_kernel_cache(fresh_stack: Stack, backing: Backing) -> None:
    pio = fresh_stack.pageio
    with clock_ahead(1.5):
        assert pio.kernel_open(backing.key, backing.stat(), writable=True) == DROP  # never seen
        assert pio.kernel_open(backing.key, backing.stat(), writable=True) == KEEP
    pio.write(backing.key, backing.fd, b"ours", 2 * PAGE + 1)  # the kernel's pages took these bytes as written
    pio.write(backing.key, backing.fd, b"grows", 9 * PAGE)  # also when the file grows
    for writable in (False, True):  # just changed, but by us: kept, not direct
        assert pio.kernel_open(backing.key, backing.stat(), writable=writable) == KEEP
    change_behind(backing, b"theirs", 4)  # and then somebody else
    assert pio.kernel_open(backing.key, backing.stat(), writable=False) == DIRECT


def test_an_append_that_lands_elsewhere_makes_the_next_open_drop(kernel_stack: Stack, backing: Backing) -> None:
    """O_APPEND: the kernel wrote the bytes into its pages at the offset it thought was the end."""
    pio = kernel_stack.pageio
    appender = os.open(backing.path, os.O_WRONLY | os.O_APPEND)
    try:
        for _ in range(2):
            pio.kernel_open(backing.key, backing.stat(), writable=True)
        size = backing.stat().st_size
        assert pio.write(backing.key, appender, b"A" * 10, size, append=True) == 10  # where the kernel placed it
        assert pio.kernel_open(backing.key, backing.stat(), writable=True) == KEEP
        assert pio.write(backing.key, appender, b"B" * 10, 7, append=True) == 10  # the kernel's offset was stale
        assert pio.kernel_open(backing.key, backing.stat(), writable=True) == DROP
    finally:
        os.close(appender)
    assert backing.path.read_bytes().endswith(b"A" * 10 + b"B" * 10)


# -- --backing-direct -----------------------------------------------------------------------------------


def direct_fd_or_skip(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        pytest.skip(f"{path.parent} refuses O_DIRECT: {exc}")


@pytest.mark.parametrize("size", [0, 100, PAGE, 3 * PAGE + 1, 9 * PAGE - 1])
def test_pread_direct_equals_pread_full(tmp_path: Path, size: int) -> None:
    path = tmp_path / "f"
    data = os.urandom(size)
    path.write_bytes(data)
    direct = direct_fd_or_skip(path)
    plain = os.open(path, os.O_RDONLY)
    try:
        for offset in range(0, 10 * PAGE, PAGE):
            for count in (PAGE, 4 * PAGE):
                expected = data[offset:offset + count]
                assert pread_full(plain, count, offset) == expected
                assert pread_direct(direct, count, offset) == expected
                assert pread_direct(plain, count, offset) == expected  # also without O_DIRECT
    finally:
        os.close(direct)
        os.close(plain)


@pytest.mark.parametrize("first_chance", ["daemon", "kernel"])
def test_backing_direct_reads_are_right_from_every_tier(tmp_path: Path, first_chance: str) -> None:
    stack = build_stack(StackConfig(page_cache_pages=2, tmem_pages=64, first_chance=first_chance,
                                    backing_direct=True, attr_timeout=0.0))
    b = Backing(tmp_path / "f", os.urandom(12 * PAGE + 7))
    reader = direct_fd_or_skip(b.path)
    try:
        pio = stack.pageio
        data = bytearray(b.path.read_bytes())
        for _ in range(3):
            assert pio.read(b.key, reader, 0, 1 << 20) == data
            assert pio.read(b.key, reader, 5 * PAGE + 3, 3 * PAGE) == data[5 * PAGE + 3:8 * PAGE + 3]
        pio.write(b.key, b.fd, b"W" * 5000, 11 * PAGE)  # through the buffered descriptor, growing the file
        data[11 * PAGE:] = b"W" * 5000
        assert pio.read(b.key, reader, 0, 1 << 20) == data
        s = pio.stats()
        assert s["backing_direct"] == 1 and s["succ_gets"] > 0, s
        pio.check()
    finally:
        os.close(reader)
        b.close()
        stack.close()


# -- one tmem host, many kernel-mode guests ------------------------------------------------------------------


@pytest.fixture
def tmemd(tmp_path: Path) -> Iterator[str]:
    from tmemcore.server import TmemServer

    server = TmemServer(tmemcore.Tmem(256, accept_v0=True), f"unix:{tmp_path}/tmemd.sock")
    address = server.start()
    try:
        yield address
    finally:
        server.stop()


@pytest.mark.xfail(strict=True, reason=(
    "BUG (guestfs.stack): every --first-chance kernel guest creates a *shared* pool with its own uuid, and "
    "a tmem host has only MAX_GLOBAL_SHARED_POOLS = 16 shared pools in all (Xen's limit): from the 17th "
    "kernel-mode guest on one tmemd, NEW_POOL fails and the guest silently runs in passthrough (no tmem), "
    "while daemon-mode guests (private pools, 16 per client) are not limited that way"))
def test_seventeen_kernel_mode_guests_on_one_tmemd_all_get_a_pool(tmemd: str) -> None:
    stacks = []
    try:
        for _ in range(17):
            stacks.append(build_stack(StackConfig(server=tmemd, first_chance="kernel")))
        modes = [stack.cleancache.mode for stack in stacks]
        assert modes == ["v1"] * 17, modes
    finally:
        for stack in stacks:
            stack.close()


def test_sixteen_kernel_mode_guests_on_one_tmemd_get_pools_and_free_them(tmemd: str) -> None:
    """The part that works: up to 16 such guests, and a guest that leaves frees its shared slot."""
    stacks = [build_stack(StackConfig(server=tmemd, first_chance="kernel")) for _ in range(16)]
    try:
        assert [stack.cleancache.mode for stack in stacks] == ["v1"] * 16
        stacks.pop().close()
        stacks.append(build_stack(StackConfig(server=tmemd, first_chance="kernel")))
        assert stacks[-1].cleancache.mode == "v1" and not stacks[-1].cleancache.exclusive_gets
    finally:
        for stack in stacks:
            stack.close()
