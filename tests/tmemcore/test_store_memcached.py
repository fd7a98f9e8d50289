"""Ephemeral page bytes in a real memcached (store/memcached.py).

Each test starts its own ``memcached`` on a free loopback port (skipped if the binary or
pymemcache is missing) and kills it in a finally. What must hold: pages round-trip; whatever
memcached drops (its LRU, a flush, the server dying) is a miss, never wrong or stale bytes;
persistent and compressed pages stay in RAM; ``check()`` holds throughout.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from tmemcore import Tmem, abi
from tmemcore.errors import InvalidArgument
from tmemcore.store import MemcachedPages, RemotePage

from tmemtest import gen, page

pymemcache = pytest.importorskip("pymemcache", reason="the memcached store needs pymemcache (extra 'memcached')")
MEMCACHED = shutil.which("memcached") or ("/usr/bin/memcached" if shutil.which("/usr/bin/memcached") else None)
pytestmark = pytest.mark.skipif(MEMCACHED is None, reason="no memcached binary on this machine")

PAGE = abi.PAGE_SIZE
START_DEADLINE = 10.0  # seconds for memcached to accept connections


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_DEADLINE
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"memcached exited with {process.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)  # polling a port with a deadline, not synchronizing threads
    raise RuntimeError(f"memcached did not listen on {port} within {START_DEADLINE} s")


class Memcached:
    def __init__(self, port: int | None = None) -> None:
        self.port = free_port() if port is None else port
        self.process = subprocess.Popen(
            [str(MEMCACHED), "-U", "0", "-l", "127.0.0.1", "-p", str(self.port), "-m", "16", "-u", "root"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until_listening(self.port, self.process)

    @property
    def url(self) -> str:
        return f"memcached://127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


@pytest.fixture
def memcached() -> Iterator[Memcached]:
    server = Memcached()
    try:
        yield server
    finally:
        server.kill()


def pg(fill: int) -> bytes:
    return bytes([fill & 0xFF]) * 64 + bytes(PAGE - 64)


def remote_pages(tmem: Tmem) -> list[RemotePage]:
    return [n[0] for c in tmem.clients.values() for p in c.pools if p is not None
            for n in p.live_nodes() if type(n[0]) is RemotePage]


def test_pages_round_trip_through_memcached(memcached: Memcached) -> None:
    t = Tmem(memory_pages=8, store=memcached.url)
    pool = t.client(1).new_pool()
    for i in range(8):
        assert pool.put(1, i, pg(i))
        t.check()
    assert len(remote_pages(t)) == 8  # the bytes are remote, the descriptors local
    for i in range(8):
        assert pool.get(1, i) == pg(i)  # exclusive: gone afterwards
        assert pool.get(1, i) is None
        t.check()
    stats = t.stats()
    assert stats["config"]["store"] == memcached.url
    assert stats["store"]["hits"] == 8 and stats["store"]["live_pages"] == 0


def test_abi_path_and_eviction_with_memcached(memcached: Memcached) -> None:
    t = Tmem(memory_pages=4, store=memcached.url)
    assert t.do_tmem_op(1, abi.new_pool_record(abi.pool_flags())) == 0
    for i in range(10):  # the host budget still evicts: 4 pages, oldest first
        assert t.do_tmem_op(1, gen(abi.TMEM_PUT_PAGE, 0, 5, i), page(i)) == 1
        t.check()
    out = bytearray(PAGE)
    assert t.do_tmem_op(1, gen(abi.TMEM_GET_PAGE, 0, 5, 0), out) == 0  # evicted by the budget
    assert t.do_tmem_op(1, gen(abi.TMEM_GET_PAGE, 0, 5, 9), out) == 1 and out == page(9)
    assert t.stats()["global"]["evicted_pgs"] == 6
    assert t.remote_pages is not None and t.remote_pages.deletes == 7  # 6 evicted + 1 got
    t.check()


def test_persistent_and_compressed_pages_stay_in_ram(memcached: Memcached) -> None:
    t = Tmem(memory_pages=8, store=memcached.url)
    pers = t.client(1).new_pool(persistent=True)
    assert pers.put(1, 0, pg(1))
    t.set_compress(2, True)
    comp = t.client(2).new_pool()
    assert comp.put(1, 0, bytes(PAGE))  # compresses well: stays in RAM, compressed
    assert remote_pages(t) == []
    assert pers.get(1, 0) == pg(1) and comp.get(1, 0) == bytes(PAGE)
    t.check()


def test_a_new_put_never_reads_an_older_value(memcached: Memcached) -> None:
    """Every put has its own key: duplicates, re-puts after a get, and a second host on the
    same server never see each other's bytes."""
    t = Tmem(memory_pages=8, store=memcached.url)
    other = Tmem(memory_pages=8, store=memcached.url)
    pool, pool2 = t.client(1).new_pool(), other.client(1).new_pool()
    assert pool.put(1, 0, pg(1))
    first = remote_pages(t)[0].key
    assert pool.put(1, 0, pg(2))  # duplicate put: new key, old item deleted
    second = remote_pages(t)[0].key
    assert first != second
    assert pool2.put(1, 0, pg(3))
    assert remote_pages(other)[0].key not in (first, second)
    assert pool.get(1, 0) == pg(2) and pool2.get(1, 0) == pg(3)
    assert pool.put(1, 0, pg(4))
    assert remote_pages(t)[0].key not in (first, second)
    assert pool.get(1, 0) == pg(4)
    t.check()
    other.check()


def test_what_memcached_drops_is_a_miss(memcached: Memcached) -> None:
    t = Tmem(memory_pages=8, store=memcached.url)
    private = t.client(1).new_pool()
    shared = t.client(1).new_pool(shared=True, uuid=(7, 7))
    for i in range(4):
        assert private.put(1, i, pg(i)) and shared.put(1, i, pg(i))
    direct = pymemcache.client.base.Client(("127.0.0.1", memcached.port))
    try:
        # the host sends its sets without waiting (noreply): make sure they arrived before
        # this other connection drops them, or the flush could overtake them
        deadline = time.monotonic() + START_DEADLINE
        while not all(direct.get(r.key) for r in remote_pages(t)):
            assert time.monotonic() < deadline, "the host's pages never reached memcached"
        for remote in remote_pages(t):
            direct.delete(remote.key)  # memcached dropping items on its own (LRU, restart, expiry)
        # (not flush_all: memcached's flush spares items stored within the current second, so a
        # flush right after the sets above left pages behind now and then)
    finally:
        direct.close()
    for i in range(4):
        assert private.get(1, i) is None and shared.get(1, i) is None
        t.check()
    assert t.npages == 0  # lost pages are gone from the host too, not left as dead weight
    stats = t.stats()
    assert stats["store"]["lost"] == 8
    assert sum(p["found_gets"] for c in stats["clients"] for p in c["pools"]) == 0


def test_killing_memcached_mid_run_turns_gets_into_misses(memcached: Memcached) -> None:
    t = Tmem(memory_pages=16, store=MemcachedPages("127.0.0.1", memcached.port, timeout=0.5, retry_after=60.0))
    pool = t.client(1).new_pool()
    assert t.do_tmem_op(1, abi.new_pool_record(abi.pool_flags())) == 1
    for i in range(8):
        assert pool.put(1, i, pg(i))
        assert t.do_tmem_op(1, gen(abi.TMEM_PUT_PAGE, 1, 3, i), page(i)) == 1
    assert pool.get(1, 0) == pg(0)
    memcached.kill()
    started = time.monotonic()
    for i in range(1, 8):
        assert pool.get(1, i) is None  # a miss, not an exception
        out = bytearray(PAGE)
        assert t.do_tmem_op(1, gen(abi.TMEM_GET_PAGE, 1, 3, i), out) == 0
        t.check()
    for i in range(8, 12):  # puts still succeed (the page is lost at once) and still count
        assert pool.put(1, i, pg(i))
        assert pool.get(1, i) is None
        t.check()
    # one failed request, then the server is left alone: no timeout per op under the host lock
    assert time.monotonic() - started < 5.0
    store = t.stats()["store"]
    assert store["get_failures"] >= 14 and store["put_failures"] == 4
    assert t.flush(1000) >= 0 and t.npages == 0  # relinquish with the server gone: deletes fail quietly
    t.check()


def test_a_restarted_server_is_used_again(memcached: Memcached, caplog: pytest.LogCaptureFixture) -> None:
    """Pages stored before the restart are misses; new pages round-trip once it is back. The outage
    and the recovery are each logged once (an unreachable store used to lose every page silently)."""
    t = Tmem(memory_pages=8, store=MemcachedPages("127.0.0.1", memcached.port, timeout=0.5, retry_after=0.0))
    pool = t.client(1).new_pool()
    assert pool.put(1, 0, pg(1))
    memcached.kill()
    with caplog.at_level("WARNING", logger="tmemd.store"):
        assert pool.get(1, 0) is None
        assert pool.get(1, 0) is None
        restarted = Memcached(memcached.port)
        try:
            assert pool.put(1, 1, pg(2))
            assert pool.get(1, 1) == pg(2)
            t.check()
        finally:
            restarted.kill()
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2 and "failed" in messages[0] and "answers again" in messages[1], messages


def test_bad_store_options_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="memcached://HOST:PORT"):
        Tmem(memory_pages=4, store="redis://localhost:1")
    with pytest.raises(InvalidArgument, match="explicit port"):
        Tmem(memory_pages=4, store="memcached://127.0.0.1")
    with pytest.raises(InvalidArgument, match="dedup"):
        Tmem(memory_pages=4, dedup=True, store="memcached://127.0.0.1:1")


def test_missing_pymemcache_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "pymemcache.client.base", None)  # import now fails
    with pytest.raises(InvalidArgument, match="needs pymemcache"):
        Tmem(memory_pages=4, store="memcached://127.0.0.1:1")


def test_tmemd_keeps_ephemeral_pages_in_memcached(memcached: Memcached, tmp_path) -> None:
    """`tmemd --store memcached://...`: a remote guest's pages live in the real memcached."""
    import sys

    from tmemcore.wire import RemoteTmem

    ready = tmp_path / "ready"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "tmemcore.server", "--listen", "tcp:127.0.0.1:0", "--insecure-tcp", "--memory", "1M",
         "--store", memcached.url, "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + START_DEADLINE
        while not ready.exists():  # poll the ready file with a deadline
            assert daemon.poll() is None and time.monotonic() < deadline, "tmemd did not start"
            time.sleep(0.02)
        with RemoteTmem(ready.read_text().strip(), 1) as remote:
            pool = remote.do_tmem_op(abi.new_pool_record(abi.pool_flags()))
            assert remote.do_tmem_op(abi.gen_record(abi.TMEM_PUT_PAGE, pool, 7, 0), bytearray(pg(0x5A))) == 1
            frame = bytearray(PAGE)
            assert remote.do_tmem_op(abi.gen_record(abi.TMEM_GET_PAGE, pool, 7, 0), frame) == 1
            assert bytes(frame) == pg(0x5A)
            assert remote.do_tmem_op(abi.gen_record(abi.TMEM_PUT_PAGE, pool, 8, 0), bytearray(pg(1))) == 1
            memcached.kill()  # page 8's bytes die with the store: they were never in tmemd's RAM
            assert remote.do_tmem_op(abi.gen_record(abi.TMEM_GET_PAGE, pool, 8, 0), bytearray(PAGE)) == 0
            # a dead store: a put still "succeeds" (the page is lost), a get is a miss, never an error
            assert remote.do_tmem_op(abi.gen_record(abi.TMEM_PUT_PAGE, pool, 9, 0), bytearray(pg(2))) == 1
            assert remote.do_tmem_op(abi.gen_record(abi.TMEM_GET_PAGE, pool, 9, 0), bytearray(PAGE)) == 0
    finally:
        daemon.kill()
        daemon.wait(timeout=10)


def test_tmemd_refuses_a_bad_store() -> None:
    import sys

    done = subprocess.run([sys.executable, "-m", "tmemcore.server", "--listen", "tcp:127.0.0.1:0", "--insecure-tcp",
                           "--store", "redis://nowhere"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("tmemd: store must be") and "Traceback" not in done.stderr
