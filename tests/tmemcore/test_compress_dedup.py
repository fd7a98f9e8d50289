"""Compression (per client, lz4), host-wide dedup and trailing-zero elimination, visible in stats."""

from __future__ import annotations

import errno
import os

import pytest
from tmemtest import ctrl

from tmemcore import Tmem, abi
from tmemcore.dedup import TZE_MAX_SIZE, tze_trim
from tmemcore.errors import NotPermitted

PAGE = 4096
TEXT = (b"the quick brown fox jumps over the lazy dog " * 100)[:PAGE]


def test_compression_stores_more_pages_and_round_trips() -> None:
    t = Tmem(memory_pages=4)
    t.client(1)
    t.set_compress(1, True)
    p = t.client(1).new_pool()
    for i in range(40):
        assert p.put(1, i, TEXT)
    assert t.npages == 40 and t.stats()["global"]["evicted_pgs"] == 0  # 40 pages in a 4-page budget
    c = t.stats()["clients"][0]
    assert c["compressed_pages"] == 40 and 0 < c["compressed_sum_size"] < 40 * PAGE // 10
    assert p.get(1, 7) == TEXT
    t.check()


def test_poor_compression_is_recorded_and_stored_raw() -> None:
    t = Tmem(memory_pages=4, compress=True)
    p = t.client(1).new_pool(persistent=True)
    noise = os.urandom(PAGE)
    assert p.put(1, 0, noise)
    c = t.stats()["clients"][0]
    assert c["compress_poor"] == 1 and c["compressed_pages"] == 0 and t.used_bytes == PAGE
    assert p.get(1, 0) == noise
    t.check()


def test_dedup_shares_identical_pages() -> None:
    t = Tmem(memory_pages=4, dedup=True)
    p = t.client(1).new_pool()
    for i in range(30):
        assert p.put(1, i, TEXT)
    g = t.stats()["global"]
    assert t.npages == 30 and t.used_bytes == PAGE
    assert g["deduped_puts"] == 29 and g["global_pcd_count"] == 1
    assert p.get(1, 3) == TEXT and p.get(1, 3) is None  # still exclusive per page
    t.check()


def test_dedup_never_applies_to_persistent_pools() -> None:
    t = Tmem(memory_pages=4, dedup=True)
    p = t.client(1).new_pool(persistent=True)
    p.put(1, 0, TEXT)
    p.put(1, 1, TEXT)
    assert t.used_bytes == 2 * PAGE and t.stats()["global"]["global_pcd_count"] == 0
    t.check()


def test_tze_trims_trailing_zeros() -> None:
    t = Tmem(memory_pages=3, dedup=True, tze=True)
    p = t.client(1).new_pool()
    half = b"x" * 1000 + bytes(PAGE - 1000)
    for i in range(10):
        p.put(1, i, bytes([i + 1]) * 3 + half[3:])  # 10 distinct pages of 1000 bytes each
    assert t.npages == 10 and t.used_bytes == 10 * 1000
    assert t.stats()["global"]["pcd_tot_tze_size"] == 10 * 1000
    assert p.get(1, 4) == bytes([5]) * 3 + half[3:]
    p.put(1, 20, bytes(PAGE))  # an all-zero page stores 0 bytes
    assert t.used_bytes == 9 * 1000
    t.check()


def test_tze_trim_rules() -> None:
    assert tze_trim(bytes(PAGE)) == b""
    assert tze_trim(b"\x01" + bytes(PAGE - 1)) == b"\x01" + bytes(7)  # a multiple of 8
    full = bytes(TZE_MAX_SIZE) + b"\x01" + bytes(PAGE - TZE_MAX_SIZE - 1)
    assert tze_trim(full) == full  # above PCD_TZE_MAX_SIZE the whole page is kept


def test_tze_needs_dedup_and_is_off_with_compression() -> None:
    assert Tmem(memory_pages=1, tze=True).tze is False
    assert Tmem(memory_pages=1, dedup=True, tze=True, compress=True).tze is False
    assert Tmem(memory_pages=1, dedup=True, tze=True).tze is True


def test_dedup_with_compression_dedups_compressed_data() -> None:
    t = Tmem(memory_pages=2, dedup=True, compress=True)
    p = t.client(1).new_pool()
    for i in range(5):
        p.put(1, i, TEXT)
    g = t.stats()["global"]
    assert g["deduped_puts"] == 4 and 0 < g["pcd_tot_csize"] < PAGE
    assert t.stats()["clients"][0]["compressed_pages"] == 5
    assert p.get(1, 2) == TEXT
    t.check()


def test_set_compress_refused_with_dedup() -> None:
    t = Tmem(memory_pages=2, dedup=True)
    t.client(1)
    with pytest.raises(NotPermitted):
        t.set_compress(1, True)
    assert ctrl(t, abi.TMEMC_SET_COMPRESS, 1, arg1=1) == -errno.EPERM
