"""The real guest stack replays traces with exactly the fast path's counts and never wrong bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guestfs.lab.mrc import LruCurve
from guestfs.lab.simulate import (
    U64,
    StackParts,
    build_guest,
    fast_counts,
    replay_into,
    replay_stack,
    stamp_key,
    stamp_page,
    stamp_units,
    tmem_class,
    wrong_byte_count,
)
from guestfs.lab.traces import load_trace, synthetic_zipf
from tmemcore.abi import TMEM_GET_PAGE

LIRS = ("cpp", "cs", "gli", "ps", "sprite", "multi1", "multi2", "multi3", "2_pools")


def assert_same_counts(keys: np.ndarray, page_cache: int, tmem: int, **kwargs: object) -> None:
    stack = replay_stack(keys, page_cache, tmem, **kwargs)
    fast = fast_counts(LruCurve.of(keys), page_cache, tmem)
    assert (stack.page_cache_hits, stack.tmem_hits, stack.misses) == (fast.page_cache_hits, fast.tmem_hits,
                                                                      fast.misses), (page_cache, tmem)
    assert stack.wrong_reads == 0 and stack.wrong_bytes == 0
    assert stack.extra["cleancache"]["succ_gets"] == stack.tmem_hits


def test_stamp_is_key_specific() -> None:
    assert len(stamp_page(5)) == 4096
    assert stamp_page(5) != stamp_page(6)
    assert wrong_byte_count(stamp_page(5), 5) == 0
    assert 0 < wrong_byte_count(stamp_page(5), 6) <= 4096


def test_stamp_units_repeat_to_the_stamped_page() -> None:
    keys = [0, 5, 1 << 16 | 7, (1 << 63) - 1, -1, -(1 << 63)]
    units = stamp_units(np.array(keys, dtype=np.int64).view(np.uint64))
    assert [unit * 256 for unit in units] == [stamp_page(key) for key in keys]
    assert [stamp_key(unit) for unit in units] == [key & U64 for key in keys]


@pytest.mark.parametrize(("page_cache", "tmem"), [(1, 0), (1, 1), (10, 50), (200, 200), (500, 3000)])
def test_synthetic_stack_equals_fast_path(page_cache: int, tmem: int) -> None:
    trace = synthetic_zipf(30_000, 4000, 0.9, seed=11)
    assert_same_counts(trace.keys, page_cache, tmem)


def test_keys_beyond_one_file_and_negative_ids() -> None:
    rng = np.random.default_rng(5)
    keys = rng.choice(np.array([-1, -2, 2**62, 2**40 + 3, 65535, 65536, 7], dtype=np.int64), 3000)
    assert_same_counts(keys, 2, 3)


def test_v0_abi_gives_the_same_counts() -> None:
    trace = synthetic_zipf(10_000, 2000, 0.9, seed=3)
    assert_same_counts(trace.keys, 50, 400, abi="v0", fold="xxh64")


def test_invariants_hold_during_a_replay() -> None:
    trace = synthetic_zipf(40_000, 3000, 0.8, seed=9)
    result = replay_stack(trace.keys, 64, 256, check_every=1)
    assert result.wrong_bytes == 0 and result.tmem_hits > 0


def test_compression_only_adds_hits() -> None:
    trace = synthetic_zipf(20_000, 3000, 0.9, seed=4)
    plain = replay_stack(trace.keys, 100, 300)
    packed = replay_stack(trace.keys, 100, 300, compress=True)
    assert packed.wrong_bytes == 0
    assert packed.hits >= plain.hits  # stamped pages compress well, so the same budget holds more


class CorruptingTransport:
    """Flips one byte of every page a GET returns: the stamp check must notice."""

    def __init__(self, inner: object) -> None:
        self.inner = inner

    def call(self, op: bytes, page: bytearray | None = None) -> int:
        rc = self.inner.call(op, page)  # type: ignore[attr-defined]
        if rc == 1 and page is not None and int.from_bytes(op[:4], "little") == TMEM_GET_PAGE:
            page[100] ^= 0xFF
        return rc

    def close(self) -> None:
        """Nothing to release."""


def test_wrong_bytes_are_detected() -> None:
    from guestfs.transport import InProcessTransport

    guest = build_guest(4, tmem_class()(memory_pages=64))
    guest.cleancache.transport = CorruptingTransport(InProcessTransport(guest.tmem))
    counts = replay_into(StackParts(guest.cache, guest.cleancache, guest.tmem), [1, 2, 3, 4, 5, 6, 1, 2], None, 0)
    assert counts["tmem"] == 2
    assert counts["wrong_reads"] == 2 and counts["wrong_bytes"] == 2


@pytest.mark.traces
@pytest.mark.parametrize("name", LIRS)
def test_lirs_stack_equals_lru_of_the_sum(traces_dir: Path, name: str) -> None:
    """page cache N + tmem M == LRU(N+M) exactly, on every LIRS trace."""
    keys = load_trace(traces_dir / "lirs" / f"{name}.trace.gz").keys
    for page_cache, tmem in ((100, 400), (500, 1500)):
        assert_same_counts(keys, page_cache, tmem)


@pytest.mark.traces
@pytest.mark.slow
def test_oltp_stack_equals_fast_path(traces_dir: Path) -> None:
    keys = load_trace(traces_dir / "arc" / "OLTP.lis.zst").keys
    assert_same_counts(keys, 1000, 4000)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2**17), min_size=1, max_size=400), st.integers(1, 12), st.integers(0, 30))
def test_stack_equals_fast_path_on_random_traces(keys: list[int], page_cache: int, tmem: int) -> None:
    """Model-based: whatever the trace, the real stack is an exact LRU + exclusive victim cache."""
    assert_same_counts(np.array(keys, dtype=np.int64), page_cache, tmem)
