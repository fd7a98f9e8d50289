"""Load and faults against a real tmemd: 64 concurrent guests doing PUT/GET with content checks while
guests are killed mid-PUT, malformed and oversized frames arrive and a foreign uid tries to impersonate
dom0 and a busy guest. Afterwards: no errors, no wrong page, the daemon's invariants hold (SIGUSR1
self-check), no pool is left, and the daemon's RSS is back within 10 % of what it was before.

The default run lasts ~5 s; the 30 s run is marked slow."""

from __future__ import annotations

import errno
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from peers import Daemon, ForeignPeer, hello_step, need_root, op_step, open_dir, start_tmemd  # noqa: F401 (fixture)
from tests.polling import wait_for
from tmemcore import abi, wire
from tmemcore.errors import EEMPTY
from tmemcore.wire import RemoteTmem

GUESTS = 64
PERSISTENT_KEYS = 8  # per guest: 64 x 8 x 4 KiB = 2 MiB, always fits the 8 MiB budget (never evicted)
EPHEMERAL_KEYS = 32  # per guest: 8 MiB in all with the persistent ones, so ephemeral pages get evicted
RSS_SLACK = 0.10
_HEADER = struct.Struct("<HBII")  # client id, pool, key, version: a page says whose and which it is


def page_for(cid: int, pool: int, key: int, version: int) -> bytes:
    unit = _HEADER.pack(cid, pool, key, version)
    return (unit * (abi.PAGE_SIZE // len(unit) + 1))[: abi.PAGE_SIZE]


@dataclass
class Tally:
    ops: int = 0
    errors: list[str] = field(default_factory=list)
    wrong_pages: int = 0
    ids: set[int] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, ops: int, errors: list[str], wrong: int, cid: int) -> None:
        with self.lock:
            self.ops += ops
            self.errors += errors
            self.wrong_pages += wrong
            self.ids.add(cid)


def run_guest(address: str, stop: threading.Event, seed: int, tally: Tally, started: threading.Barrier) -> None:
    """One guest: a persistent pool (every get must hit with the last page put) and an ephemeral one (a
    get may miss, a hit must be the last page put and is exclusive), from the moment all guests are
    connected (``started``) until ``stop``."""
    rng = random.Random(seed)
    errors: list[str] = []
    wrong = ops = 0
    cid = -1
    try:
        with RemoteTmem(address, wire.CLIENT_ANY, timeout=30) as remote:
            cid = remote.connect()
            persistent = remote.do_tmem_op(abi.new_pool_record(abi.pool_flags(persistent=True)))
            ephemeral = remote.do_tmem_op(abi.new_pool_record(abi.pool_flags()))
            if (persistent, ephemeral) != (0, 1):
                raise AssertionError(f"NEW_POOL gave {persistent}, {ephemeral}")
            versions = {(0, key): 0 for key in range(PERSISTENT_KEYS)}
            for key in range(PERSISTENT_KEYS):
                assert remote.do_tmem_op(abi.gen_record(abi.TMEM_PUT_PAGE, 0, key, key),
                                         bytearray(page_for(cid, 0, key, 0))) == 1
            live: dict[int, int] = {}  # ephemeral key -> version put and not yet got
            started.wait(60)
            page = bytearray(abi.PAGE_SIZE)
            while not stop.is_set():
                ops += 1
                choice = rng.random()
                if choice < 0.25:
                    key = rng.randrange(PERSISTENT_KEYS)
                    versions[(0, key)] += 1
                    rc = remote.do_tmem_op(abi.gen_record(abi.TMEM_PUT_PAGE, 0, key, key),
                                           bytearray(page_for(cid, 0, key, versions[(0, key)])))
                    if rc != 1:
                        errors.append(f"client {cid}: persistent put rc {rc}")
                elif choice < 0.5:
                    key = rng.randrange(PERSISTENT_KEYS)
                    rc = remote.do_tmem_op(abi.gen_record(abi.TMEM_GET_PAGE, 0, key, key), page)
                    if rc != 1:
                        errors.append(f"client {cid}: persistent get rc {rc}")
                    elif page != page_for(cid, 0, key, versions[(0, key)]):
                        wrong += 1
                elif choice < 0.75:
                    key = rng.randrange(EPHEMERAL_KEYS)
                    live[key] = live.get(key, 0) + 1
                    rc = remote.do_tmem_op(abi.gen_record(abi.TMEM_PUT_PAGE, 1, key, 0),
                                           bytearray(page_for(cid, 1, key, live[key])))
                    if rc != 1:
                        errors.append(f"client {cid}: ephemeral put rc {rc}")
                else:
                    key = rng.randrange(EPHEMERAL_KEYS)
                    rc = remote.do_tmem_op(abi.gen_record(abi.TMEM_GET_PAGE, 1, key, 0), page)
                    if rc == 1:
                        if key not in live or page != page_for(cid, 1, key, live[key]):
                            wrong += 1
                        live.pop(key, None)  # a private ephemeral get is exclusive
                    elif rc in (0, -EEMPTY):
                        live.pop(key, None)  # evicted (or never there): a miss is allowed
                    else:
                        errors.append(f"client {cid}: ephemeral get rc {rc}")
    except Exception as exc:  # noqa: BLE001 (every failure is counted, the test asserts there are none)
        errors.append(f"client {cid}: {type(exc).__name__}: {exc}")
    tally.add(ops, errors, wrong, cid)


KILLED_GUEST = """
import sys
from tmemcore import abi, wire
from tmemcore.wire import RemoteTmem
remote = RemoteTmem(sys.argv[1], wire.CLIENT_ANY, timeout=30)
remote.connect()
assert remote.do_tmem_op(abi.new_pool_record(abi.pool_flags(persistent=True))) == 0
print("putting", flush=True)
index = 0
while True:  # until SIGKILL, which lands mid-PUT (or between two)
    remote.do_tmem_op(abi.gen_record(abi.TMEM_PUT_PAGE, 0, 1, index % 64), bytearray(4096))
    index += 1
"""


def kill_guests_mid_put(address: str, rounds: int) -> None:
    for _ in range(rounds):
        guest = subprocess.Popen([sys.executable, "-c", KILLED_GUEST, address], stdout=subprocess.PIPE, text=True)
        try:
            assert guest.stdout is not None and guest.stdout.readline() == "putting\n"
        finally:
            guest.kill()
            guest.wait(timeout=10)
            if guest.stdout is not None:
                guest.stdout.close()


def send_faults(address: str) -> int:
    """Malformed, oversized and cut-off frames on fresh connections; how many were sent."""
    path = str(wire.parse_address(address).sockaddr)
    put = wire.encode_request(abi.gen_record(abi.TMEM_PUT_PAGE, 0, 1, 1), bytearray(abi.PAGE_SIZE))
    new_pool = wire.encode_request(abi.new_pool_record(abi.pool_flags(persistent=True)), None)
    faults = [
        struct.pack("<I", wire.MAX_PAYLOAD + 1),  # an oversized first frame
        b"GET / HTTP/1.0\r\n\r\n",  # not this protocol
        struct.pack("<I", 12) + b"TMEMWIRE\x09\x00\x01\x00",  # a hello of another protocol version
        # a hello, then an oversized request, a request whose header lies, a PUT cut off mid-page
        struct.pack("<I", 12) + wire.encode_hello(wire.CLIENT_ANY) + struct.pack("<I", wire.MAX_PAYLOAD + 1),
        struct.pack("<I", 12) + wire.encode_hello(wire.CLIENT_ANY) + struct.pack("<I", 6) + struct.pack("<BBI", 7, 0, 0),
        struct.pack("<I", 12) + wire.encode_hello(wire.CLIENT_ANY) + struct.pack("<I", len(new_pool)) + new_pool
        + struct.pack("<I", len(put)) + put[:2000],
    ]
    for fault in faults:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(path)
            try:
                sock.sendall(fault)
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(4096):  # until the server closes it
                    pass
            except (ConnectionResetError, BrokenPipeError):
                pass  # refused before it read everything: fine
    return len(faults)


def listing(address: str) -> str:
    with RemoteTmem(address, 0, timeout=10) as dom0:
        buf = bytearray(1 << 20)
        assert dom0.do_tmem_op(abi.control_record(abi.TMEMC_LIST, arg1=len(buf)), buf) == 0
        return bytes(buf).split(b"\0", 1)[0].decode()


def run_load(daemon: Daemon, seconds: float) -> None:
    address = daemon.address
    tally = Tally()
    rss_before = daemon.rss_kib()
    stop = threading.Event()
    started = threading.Barrier(GUESTS + 1)
    threads = [threading.Thread(target=run_guest, args=(address, stop, seed, tally, started), daemon=True)
               for seed in range(GUESTS)]
    for thread in threads:
        thread.start()
    started.wait(60)
    loaded_at = time.monotonic()
    try:
        assert len(set(daemon_clients(address))) == GUESTS
        # faults while the guests run (the guests stop only after them, however long they take)
        with ForeignPeer(address, [hello_step(0), hello_step(1), hello_step(GUESTS // 2)]) as impostor:
            assert [r["status"] for r in impostor.results] == [-errno.EPERM] * 3, impostor.results  # dom0, 2 busy ids
        kill_guests_mid_put(address, rounds=3)
        faults = send_faults(address)
        threading.Event().wait(max(0.0, loaded_at + seconds - time.monotonic()))  # the rest of the load's time
    finally:
        stop.set()
    for thread in threads:
        thread.join(60)
    peak = [daemon.rss_kib()]
    assert time.monotonic() - loaded_at >= seconds * 0.9
    assert not any(thread.is_alive() for thread in threads)
    assert tally.errors == [] and tally.wrong_pages == 0, (tally.errors[:5], tally.wrong_pages)
    assert len(tally.ids) == GUESTS and tally.ops > GUESTS * 10
    # the guests are gone: so are their pools, and the killed guests' and faulty connections' too
    assert wait_for(lambda: "P=" not in listing(address), timeout=20), listing(address)
    daemon.process.send_signal(signal.SIGUSR1)
    assert daemon.wait_log("self-check: invariants hold"), daemon.log_text()[-2000:]
    assert "self-check FAILED" not in daemon.log_text()
    assert daemon.log_text().count("malformed frame") >= faults - 1
    limit = rss_before * (1 + RSS_SLACK)
    assert wait_for(lambda: daemon.rss_kib() <= limit, timeout=10, interval=0.2), \
        f"RSS {daemon.rss_kib()} KiB after the guests left, {rss_before} KiB before"
    print(f"{GUESTS} guests, {seconds:g} s: {tally.ops} ops, daemon RSS {rss_before} KiB before, {peak[0]} KiB "
          f"at the end of the load, {daemon.rss_kib()} KiB after")


def daemon_clients(address: str) -> list[str]:
    return [line.split(",")[0] for line in listing(address).splitlines() if line.startswith("P=")]


def start_load_daemon(workdir: Path) -> Daemon:
    # every load guest is root's (one principal): room for the 64 and for the guests killed mid-PUT
    daemon = start_tmemd(workdir, f"unix:{workdir}/tmemd.sock", "--socket-mode", "0666",
                         "--max-per-principal", str(2 * GUESTS), memory="8M")
    # warm up once (imports, the first thread stacks), so "before" is the daemon at rest, not half-started
    with RemoteTmem(daemon.address, wire.CLIENT_ANY) as warm:
        assert warm.do_tmem_op(abi.new_pool_record(abi.pool_flags())) == 0
    assert wait_for(lambda: "P=" not in listing(daemon.address))
    return daemon


@pytest.mark.timeout(180)
def test_64_guests_for_5_seconds_with_faults(open_dir: Path):  # noqa: F811
    need_root()
    daemon = start_load_daemon(open_dir)
    try:
        run_load(daemon, seconds=5)
        assert daemon.stop() == 0
    finally:
        daemon.kill()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_64_guests_for_30_seconds_with_faults(open_dir: Path):  # noqa: F811
    need_root()
    daemon = start_load_daemon(open_dir)
    try:
        run_load(daemon, seconds=30)
        assert daemon.stop() == 0
    finally:
        daemon.kill()
