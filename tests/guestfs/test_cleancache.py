"""CleanCache frontend: pool lifetime, ABI selection, exclusive gets, coherence, collision guard."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tmemcore import abi

from guestfs.cleancache import CleanCache
from guestfs.filekey import FileKey
from guestfs.transport import MockTransport, NullTransport

PAGE = abi.PAGE_SIZE


def key(oid: int, ino: int = 0) -> FileKey:
    return FileKey(oid=oid, source="synthetic", ino=ino or oid)


def page(tag: int) -> bytes:
    return tag.to_bytes(8, "little") * (PAGE // 8)


def started(**kwargs: object) -> tuple[CleanCache, MockTransport]:
    versions = kwargs.pop("versions", (1,))
    transport = MockTransport(spec_versions=versions)  # type: ignore[arg-type]
    cc = CleanCache(transport, **kwargs)  # type: ignore[arg-type]
    cc.init_fs()
    cc.check()
    return cc, transport


def test_v1_pool_roundtrip_and_exclusive_get() -> None:
    cc, host = started()
    assert cc.mode == "v1" and cc.active
    cc.put_page(key(5), 3, page(1))
    cc.check()
    assert cc.get_page(key(5), 3) == page(1)
    assert cc.get_page(key(5), 3) is None  # private ephemeral get is exclusive
    cc.check()
    s = cc.stats()
    assert (s["succ_gets"], s["failed_gets"], s["puts"]) == (1, 1, 1)
    assert s["gets_skipped"] == 1 and host.ops["GET_PAGE"] == 1


def test_v1_wire_oid_is_the_key_oid() -> None:
    cc, host = started()
    oid = 0x1111 | 0x2222 << 64 | 0x3333 << 128
    cc.put_page(key(oid, ino=9), 0, page(2))
    assert (oid, 0) in host.pools[0]


def test_partial_page_is_zero_padded() -> None:
    cc, _ = started()
    cc.put_page(key(1), 0, b"abc")
    assert cc.get_page(key(1), 0) == b"abc" + bytes(PAGE - 3)


def test_put_of_oversized_page_is_refused_and_changes_nothing() -> None:
    cc, host = started()
    with pytest.raises(ValueError, match="at most 4096"):
        cc.put_page(key(1), 0, bytes(PAGE + 1))
    assert cc.stats()["puts"] == 0 and host.ops.get("PUT_PAGE", 0) == 0
    cc.check()


def test_invalidate_page_and_inode() -> None:
    cc, host = started()
    for i in range(3):
        cc.put_page(key(7), i, page(i))
    cc.invalidate_page(key(7), 1)
    assert cc.get_page(key(7), 1) is None
    cc.invalidate_inode(key(7))
    assert not host.pools[0]
    assert cc.get_page(key(7), 0) is None and cc.get_page(key(7), 2) is None
    cc.check()
    assert cc.stats()["tracked_objects"] == 0


def test_invalidate_of_never_put_file_sends_nothing() -> None:
    cc, host = started()
    cc.invalidate_inode(key(3))
    cc.invalidate_page(key(3), 0)
    assert "FLUSH_OBJECT" not in host.ops and "FLUSH_PAGE" not in host.ops
    assert cc.stats()["invalidates"] == 2


def test_invalidate_fs_destroys_pool_and_allows_reinit() -> None:
    cc, host = started()
    cc.put_page(key(1), 0, page(1))
    cc.invalidate_fs()
    assert cc.mode == "passthrough" and not host.pools
    cc.check()
    cc.init_fs()
    assert cc.mode == "v1" and cc.get_page(key(1), 0) is None


def test_init_twice_is_misuse() -> None:
    cc, _ = started()
    with pytest.raises(RuntimeError, match="twice"):
        cc.init_fs()
    assert cc.mode == "v1"


@pytest.mark.parametrize(
    ("abi_name", "host_versions", "mode"),
    [
        ("v1", (1,), "v1"),
        ("v1", (0,), "passthrough"),
        ("v0", (0,), "v0-xxh64"),
        ("v0", (1,), "passthrough"),
        ("auto", (1,), "v1"),
        ("auto", (0,), "v0-xxh64"),
        ("auto", (), "passthrough"),
        ("auto", (0, 1), "v1"),
    ],
)
def test_abi_selection(abi_name: str, host_versions: tuple[int, ...], mode: str) -> None:
    cc, _ = started(abi=abi_name, versions=host_versions)
    assert cc.mode == mode


def test_auto_does_not_retry_v0_on_other_errors() -> None:
    cc = CleanCache(NullTransport(), abi="auto")
    cc.init_fs()
    assert cc.mode == "passthrough" and str(-errno.ENODEV) in cc.disabled_reason
    assert cc.transport.calls == 1  # type: ignore[attr-defined]
    cc.put_page(key(1), 0, page(1))
    assert cc.get_page(key(1), 0) is None
    assert cc.stats()["puts"] == 0
    cc.check()


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="abi must be"):
        CleanCache(NullTransport(), abi="v2")
    with pytest.raises(ValueError, match="fold must be"):
        CleanCache(NullTransport(), fold="crc")


def test_v0_records_are_40_bytes_with_folded_oid() -> None:
    cc, host = started(abi="v0", versions=(0,))
    big = key(1 << 150 | 77, ino=77)
    cc.put_page(big, 2, page(3))
    ((oid, index),) = host.pools[0]
    assert oid == cc.wire_oid(big) and oid < 1 << 64 and index == 2
    assert cc.get_page(big, 2) == page(3)


def test_v0_ino_fold_collision_is_guarded_and_released_on_invalidate() -> None:
    cc, host = started(abi="v0", fold="ino", versions=(0,))
    a, b = key(1 << 64 | 257, ino=257), key(2 << 64 | 257, ino=257)  # same ino, different files
    cc.put_page(a, 0, page(0xA))
    cc.put_page(b, 0, page(0xB))  # b's folded oid is owned by a: bypassed
    assert cc.stats()["fold_collisions"] == 1 and cc.stats()["puts_dropped"] == 1
    assert cc.get_page(b, 0) is None  # never a's bytes
    assert cc.get_page(a, 0) == page(0xA)  # a's object is now empty: ownership released
    cc.put_page(b, 0, page(0xB))
    assert cc.get_page(b, 0) == page(0xB)
    cc.put_page(b, 1, page(0xB1))
    cc.invalidate_inode(b)
    cc.put_page(a, 1, page(0xA1))
    assert cc.get_page(a, 1) == page(0xA1)
    cc.check()


def test_v1_oid_collision_between_handle_types_is_guarded() -> None:
    cc, _ = started()
    a = FileKey(oid=42, source="handle", handle_type=1, handle=(42).to_bytes(8, "little"))
    b = FileKey(oid=42, source="handle", handle_type=0x81, handle=(42).to_bytes(12, "little"))
    cc.put_page(a, 0, page(1))
    cc.put_page(b, 0, page(2))
    assert cc.get_page(b, 0) is None and cc.stats()["oid_collisions"] == 1
    assert cc.get_page(a, 0) == page(1)


def test_index_beyond_u32_is_skipped_like_linux() -> None:
    cc, host = started()
    cc.put_page(key(1), 1 << 32, page(1))
    assert cc.get_page(key(1), 1 << 32) is None
    assert cc.stats()["index_overflows"] == 1 and "PUT_PAGE" not in host.ops


def test_transport_failure_is_a_miss_and_switches_off() -> None:
    cc, host = started()
    cc.put_page(key(1), 0, page(1))
    host.fail_after = host.calls
    assert cc.get_page(key(1), 0) is None
    s = cc.stats()
    assert s["transport_errors"] == 1 and s["mode"] == "passthrough" and "transport error" in str(s["disabled_reason"])
    cc.put_page(key(1), 0, page(1))
    assert cc.get_page(key(1), 0) is None and cc.stats()["transport_errors"] == 1
    cc.check()


def test_tracking_is_bounded_by_flushing_oldest_object() -> None:
    host = MockTransport()
    cc = CleanCache(host, max_tracked_pages=4)
    cc.init_fs()
    for oid in range(1, 4):
        cc.put_page(key(oid), 0, page(oid))
        cc.put_page(key(oid), 1, page(oid))
        cc.check()
    assert cc.stats()["tracked_object_flushes"] == 1
    assert cc.get_page(key(1), 0) is None  # the oldest object was flushed
    assert cc.get_page(key(3), 1) == page(3)
    assert all(h[0] != 1 for h in host.pools[0])


ops = st.lists(
    st.tuples(st.sampled_from(["put", "get", "inv_page", "inv_inode"]), st.integers(1, 3), st.integers(0, 3)),
    max_size=60,
)


@settings(max_examples=80, deadline=None)
@given(
    ops=ops,
    abi_name=st.sampled_from(["v1", "v0"]),
    fold=st.sampled_from(["xxh64", "ino"]),
    host_pages=st.sampled_from([0, 2, 64]),
)
def test_behaves_like_a_dict_with_losses(ops: list[tuple[str, int, int]], abi_name: str, fold: str, host_pages: int) -> None:
    """Whatever a get returns equals the last put for that page (never another file's bytes).

    host_pages 0 is the mock host (lossless); otherwise a real tmemcore host that small evicts.
    """
    if host_pages:
        import tmemcore
        from guestfs.transport import InProcessTransport

        host = tmemcore.Tmem(memory_pages=host_pages, accept_v0=True)
        cc = CleanCache(InProcessTransport(host), abi=abi_name, fold=fold)
        cc.init_fs()
    else:
        cc, _ = started(abi=abi_name, fold=fold, versions=(0, 1))
    model: dict[tuple[int, int], bytes] = {}
    version = 0
    for op, file, index in ops:
        k = key(file << 64 | 99, ino=99)  # same ino: the ino fold collides on purpose
        if op == "put":
            version += 1
            data = page(file << 32 | index << 16 | version)
            cc.put_page(k, index, data)
            model[(file, index)] = data
        elif op == "get":
            got = cc.get_page(k, index)
            expected = model.pop((file, index), None)
            assert got is None or got == expected
        elif op == "inv_page":
            cc.invalidate_page(k, index)
            model.pop((file, index), None)
        else:
            cc.invalidate_inode(k)
            model = {fi: d for fi, d in model.items() if fi[0] != file}
        cc.check()
        if host_pages:
            host.check()
