"""save_client / restore_client against the real host, golden streams, and fuzzed restores.

Golden files live in tests/golden/; regenerate them (after a deliberate format change only)
with ``TMEM_REGEN_GOLDEN=1 pytest tests/tmemcore/test_savestream_host.py``.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tmemcore import abi
from tmemcore.errors import StreamError
from tmemcore.oid import Oid
from tmemcore.savestream import (
    convert,
    decode_stream,
    encode_stream,
    host_versions,
    restore_client,
    save_client,
    snapshot_client,
)
from tmemcore.tmem import Tmem

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
PAGE_1 = bytes(range(256)) * 16
PAGE_2 = b"tmem" * 1024
PAGE_3 = b"\x00" * 4000 + b"tail" * 24
WIDE = Oid.from_words(0x1111, 0x2222, 0x3333)


def control(host: Tmem, subop: int, cid: int, arg1: int = 0) -> int:
    record = abi.control_record(subop, cid, arg1=arg1, version=abi.SPEC_V0 if host.spec_version == 0 else 1)
    return host.do_tmem_op(0, record, None)


def known_host(version: int = abi.SPEC_V1) -> Tmem:
    """The state the golden files were saved from: one ephemeral and one persistent pool."""
    host = Tmem(memory_pages=32, spec_version=version)
    client = host.client(1)
    ephemeral = client.new_pool(version=version)
    assert ephemeral.put(Oid(3), 0, PAGE_3)  # ephemeral pages are never saved
    persistent = client.new_pool(persistent=True, version=version)
    assert persistent.put(WIDE if version == abi.SPEC_V1 else Oid(0x1111), 0, PAGE_1)
    assert persistent.put(Oid(7), 5, PAGE_2)
    assert control(host, abi.TMEMC_SET_WEIGHT, 1, 2) == 0
    assert control(host, abi.TMEMC_SET_CAP, 1, 3) == 0
    host.check()
    return host


def saved(host: Tmem, cid: int = 1, live: bool = False) -> bytes:
    out = io.BytesIO()
    written = save_client(host, cid, out, live=live)
    assert written == len(out.getvalue())
    host.check()
    return out.getvalue()


def restored(raw: bytes, cid: int = 4, **host_args: Any) -> Tmem:
    host = Tmem(memory_pages=32, **host_args)
    restore_client(host, cid, io.BytesIO(raw))
    host.check()
    return host


def pages_of(host: Tmem, cid: int) -> dict[tuple[int, int, int], bytes]:
    """Every page a client holds, via the Pythonic API (persistent gets do not remove)."""
    client = host.client(cid)
    found = {}
    for pool_id, pool in enumerate(client.pools):
        if pool is None or not pool.persistent:
            continue
        handle = client.handle(pool_id)
        for node in list(pool.live_nodes()):
            oid, index = node[2], node[3]
            found[(pool_id, oid, index)] = handle.get(oid, index)
    return found


# ------------------------------------------------------------------ golden files


@pytest.mark.parametrize("version", abi.SPEC_VERSIONS)
def test_golden_stream(version: int):
    raw = saved(known_host(version))
    golden = GOLDEN / f"stream_v{version}.tmem"
    if os.environ.get("TMEM_REGEN_GOLDEN"):
        golden.write_bytes(raw)
    assert raw == golden.read_bytes(), f"v{version} stream differs from {golden}"
    image = decode_stream(raw)
    assert (image.version, image.weight, image.cap, image.flags) == (version, 2, 3, 0)
    assert [(p.pool_id, p.persistent, p.stream_n_pages, len(p.pages)) for p in image.pools] == [
        (0, False, 0, 0),
        (1, True, 2, 2),
    ]


def test_golden_v0_converts_to_golden_v1_shape():
    v0 = decode_stream((GOLDEN / "stream_v0.tmem").read_bytes())
    v1 = convert(v0, abi.SPEC_V1)
    assert [oid for oid, _, _ in v1.pools[1].pages] == [Oid(0x1111), Oid(7)]
    assert all(abi.flags_version(p.flags) == 1 for p in v1.pools)


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("version", abi.SPEC_VERSIONS)
def test_save_restore_save_is_identical(version: int):
    source = known_host(version)
    first = saved(source)
    target = restored(first, spec_version=version)
    assert saved(target, 4) == first
    assert pages_of(target, 4) == pages_of(source, 1)
    client = target.client(4)
    assert (client.weight, client.cap, client.frozen) == (2, 3, False)  # saved values, not Xen 4.1's zeros


def test_save_leaves_the_source_as_it_was():
    host = known_host()
    before = pages_of(host, 1)
    saved(host)
    assert not host.client(1).frozen and pages_of(host, 1) == before


def test_client_without_pools_writes_nothing():
    host = Tmem(memory_pages=4)
    host.client(2)
    out = io.BytesIO()
    assert save_client(host, 2, out) == 0 and out.getvalue() == b""
    assert save_client(host, 77, out) == 0  # no such client either


def test_frozen_and_compressed_client_comes_back_frozen_and_compressed():
    host = known_host()
    assert control(host, abi.TMEMC_SET_COMPRESS, 1, 1) == 0
    assert control(host, abi.TMEMC_FREEZE, 1) == 0
    raw = saved(host)
    assert host.client(1).frozen  # SAVE_END restored the pre-save frozen state
    image = decode_stream(raw)
    assert image.frozen and image.compress
    target = restored(raw)
    assert target.client(4).frozen and target.client(4).compress
    assert pages_of(target, 4) == pages_of(host, 1)  # frozen last, so the pages got in


def test_live_save_carries_pages_flushed_during_the_save():
    host = known_host()

    class GuestKeepsRunning:
        """Forwards to the host; right after SAVE_BEGIN the guest flushes a persistent page."""

        def do_tmem_op(self, cid: int, op: bytes, page: bytearray | None = None) -> int:
            rc = host.do_tmem_op(cid, op, page)
            if abi.TmemOp.decode(op).subop == abi.TMEMC_SAVE_BEGIN:
                assert host.client(1).handle(1).flush_page(Oid(7), 5)
            return rc

        def destroy_client(self, cid: int) -> None:
            host.destroy_client(cid)

    out = io.BytesIO()
    save_client(GuestKeepsRunning(), 1, out, live=True)
    image = decode_stream(out.getvalue())
    assert image.invalidated == [(1, Oid(7), 5)]
    target = restored(out.getvalue())
    assert set(pages_of(target, 4)) == {(1, WIDE, 0)}  # the extra section flushed the page again
    assert not host.client(1).live_migrating


# ------------------------------------------------------------------ versions


def test_host_versions():
    assert host_versions(Tmem(memory_pages=1)) == (1,)
    assert host_versions(Tmem(memory_pages=1, accept_v0=True)) == (1, 0)
    assert host_versions(Tmem(memory_pages=1, spec_version=0)) == (0,)


def test_v0_stream_on_a_v1_host_is_refused_without_convert():
    raw = saved(known_host(abi.SPEC_V0))
    host = Tmem(memory_pages=32)
    with pytest.raises(StreamError, match="stream is v0 but this host accepts only v1 for client 4"):
        restore_client(host, 4, io.BytesIO(raw))
    assert 4 not in host.clients
    host.check()


def test_v0_stream_restores_as_v0_on_an_accept_v0_host():
    source = known_host(abi.SPEC_V0)
    raw = saved(source)
    target = restored(raw, accept_v0=True)
    assert target.client(4).version == 0
    assert saved(target, 4) == raw


def test_v0_to_v1_conversion_on_restore():
    source = known_host(abi.SPEC_V0)
    host = Tmem(memory_pages=32)
    restore_client(host, 4, io.BytesIO(saved(source)), convert=True)
    host.check()
    assert host.client(4).version == 1
    assert pages_of(host, 4) == pages_of(source, 1)
    page = bytearray(abi.PAGE_SIZE)  # and a v1 guest reads it with v1 records
    assert host.do_tmem_op(4, abi.gen_record(abi.TMEM_GET_PAGE, 1, 0x1111, 0), page) == 1
    assert page == PAGE_1


def test_v1_to_v0_conversion_on_restore_when_oids_fit():
    source = Tmem(memory_pages=8)
    pool = source.client(1).new_pool(persistent=True)
    assert pool.put(Oid(42), 1, PAGE_2)
    host = Tmem(memory_pages=8, spec_version=0)
    restore_client(host, 4, io.BytesIO(saved(source)), convert=True)
    host.check()
    page = bytearray(abi.PAGE_SIZE)
    assert host.do_tmem_op(4, abi.gen_record(abi.TMEM_GET_PAGE, 0, 42, 1, version=0), page) == 1
    assert page == PAGE_2


def test_v1_to_v0_conversion_of_a_wide_oid_fails_and_changes_nothing():
    raw = saved(known_host())
    host = Tmem(memory_pages=8, spec_version=0)
    before = host.stats()
    with pytest.raises(StreamError, match=r"pool 1 page oid Oid\(0x1111, 0x2222, 0x3333\) index 0"):
        restore_client(host, 4, io.BytesIO(raw), convert=True)
    assert host.stats() == before
    host.check()


# ------------------------------------------------------------------ failures and rollback


def test_restore_into_an_existing_client_touches_nothing():
    host = known_host()
    before = pages_of(host, 1)
    with pytest.raises(StreamError, match="already exists"):
        restore_client(host, 1, io.BytesIO(saved(host)))
    assert pages_of(host, 1) == before
    host.check()


def test_failure_while_applying_rolls_back():
    raw = saved(known_host())
    host = Tmem(memory_pages=1)  # room for one persistent page, the stream has two
    other = host.client(2).new_pool()
    assert other.put(Oid(1), 1, PAGE_3)
    with pytest.raises(StreamError, match="restore of client 4 rolled back: RESTORE_PUT_PAGE pool 1"):
        restore_client(host, 4, io.BytesIO(raw))
    assert 4 not in host.clients
    assert host.client(2).handle(0).npages in (0, 1)  # ephemeral: may have been evicted for room
    host.check()


def test_truncated_stream_changes_nothing():
    raw = saved(known_host())
    host = known_host()
    before = host.stats()
    for cut in (0, 3, 40, 100, len(raw) - 1):
        with pytest.raises(StreamError):
            restore_client(host, 4, io.BytesIO(raw[:cut]))
    assert host.stats() == before
    host.check()


def content(host: Tmem) -> str:
    """What a guest could observe: clients, their settings, pools and persistent pages."""
    view = {
        cid: {
            "settings": (c.weight, c.cap, c.frozen, c.compress, c.version),
            "pools": [None if p is None else (p.persistent, p.shared, p.uuid, p.npages) for p in c.pools],
            "pages": sorted((k[0], int(k[1]), k[2], v) for k, v in pages_of(host, cid).items()),
        }
        for cid, c in sorted(host.clients.items())
    }
    return json.dumps(view, default=lambda b: b.hex())


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzzed_streams_raise_stream_error_or_restore_cleanly(data: st.DataObject):
    raw = bytearray(saved(known_host()))
    how = data.draw(st.sampled_from(["truncate", "flip", "random", "overwrite"]))
    if how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif how == "flip":
        for _ in range(data.draw(st.integers(1, 3))):
            bit = data.draw(st.integers(0, len(raw) * 8 - 1))
            raw[bit // 8] ^= 1 << (bit % 8)
    elif how == "random":
        raw = bytearray(data.draw(st.binary(max_size=200)))
    else:
        at = data.draw(st.integers(0, 120))
        raw[at : at + 4] = data.draw(st.binary(min_size=4, max_size=4))
    host = Tmem(memory_pages=8)
    host.client(0)  # dom0 exists (the host creates it on its first control op anyway)
    assert host.client(2).new_pool(persistent=True).put(Oid(9), 9, PAGE_1)
    before_content = content(host)  # its gets bump counters, so the stats come after
    before_stats = host.stats()
    try:
        restore_client(host, 4, io.BytesIO(bytes(raw)))
    except StreamError as exc:
        event("rolled back" if str(exc).startswith("restore of client") else "refused")
        assert "\n" not in str(exc)
        if not str(exc).startswith("restore of client"):
            assert host.stats() == before_stats  # refused before a single hypercall
        assert content(host) == before_content
    else:
        event("restored")
        assert 4 in host.clients
        image = snapshot_client(host, 4)
        assert image is None or encode_stream(image) is not None
    host.check()


def test_the_v0_to_v1_example_runs(capsys: pytest.CaptureFixture[str]):
    import runpy

    example = Path(__file__).resolve().parents[2] / "examples" / "save_restore_v0_to_v1.py"
    runpy.run_path(str(example), run_name="__main__")
    out = capsys.readouterr().out
    assert "plain restore refused: stream is v0" in out
    assert out.count("intact=True") == 2 and "back to v0 refused" in out


def test_shared_pools_keep_their_uuid():
    source = Tmem(memory_pages=8)
    client = source.client(1)
    client.new_pool(shared=True, uuid=(5, 6))
    shared_persistent = client.new_pool(persistent=True, shared=True, uuid=(7, 8))
    assert shared_persistent.put(Oid(1), 1, PAGE_1)
    raw = saved(source)
    image = decode_stream(raw)
    assert [(p.kind, p.uuid) for p in image.pools] == [
        ("ephemeral/shared", (5, 6)),
        ("persistent/shared", (7, 8)),
    ]
    target = restored(raw)
    assert saved(target, 4) == raw
    assert [p.uuid for p in target.client(4).pools if p is not None] == [(5, 6), (7, 8)]


def test_private_pools_are_saved_without_a_uuid():
    """Xen keeps a uuid for shared pools only; a private pool's is (0, 0) in the stream, as in LIST."""
    source = Tmem(memory_pages=8)
    source.client(1).new_pool(persistent=True, uuid=(5, 6))  # a private pool: its uuid is not kept
    assert [p.uuid for p in decode_stream(saved(source)).pools] == [(0, 0)]


def test_a_rolled_back_restore_leaves_other_clients_pages_in_a_shared_pool():
    """The restore joins an existing shared persistent pool and writes into an object that client 1
    also has pages in; the rollback (no room for a later page) must not take client 1's pages along
    when the restoring client leaves the pool (a sharer that leaves takes the objects it touched last)."""
    shared, persistent_shared = (0x1234, 0x5678), abi.TMEM_POOL_PERSIST | abi.TMEM_POOL_SHARED
    source = Tmem(memory_pages=16)
    op = source.do_tmem_op
    assert op(9, abi.new_pool_record(abi.pool_flags() | persistent_shared, shared)) == 0
    assert op(9, abi.new_pool_record(abi.pool_flags(persistent=True))) == 1
    assert op(9, abi.gen_record(abi.TMEM_PUT_PAGE, 0, 5, 0), bytearray(PAGE_1)) == 1  # into client 1's object 5
    for oid in range(3):
        assert op(9, abi.gen_record(abi.TMEM_PUT_PAGE, 1, oid, 0), bytearray(PAGE_2)) == 1
    raw = saved(source, 9)

    target = Tmem(memory_pages=5)
    op = target.do_tmem_op
    assert op(1, abi.new_pool_record(abi.pool_flags() | persistent_shared, shared)) == 0
    for oid, index in ((5, 1), (5, 2), (6, 0)):
        assert op(1, abi.gen_record(abi.TMEM_PUT_PAGE, 0, oid, index), bytearray(PAGE_3)) == 1
    before = pages_of(target, 1)
    with pytest.raises(StreamError, match="rolled back"):  # 3 + 1 + 3 persistent pages do not fit in 5
        target.restore(9, io.BytesIO(raw))
    assert 9 not in target.clients and pages_of(target, 1) == before
    assert target.client(1).handle(0)._pool.last_client == {5: 1, 6: 1}
    target.check()
