"""build_stack: the whole guest stack over the embedded host."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from guestfs.filekey import FileKey, key_for_fd
from guestfs.stack import StackConfig, build_stack

KEY = FileKey(oid=1, source="synthetic", ino=1)


@pytest.fixture
def needs_host() -> None:
    import tmemcore

    if not hasattr(tmemcore, "Tmem"):
        pytest.skip("tmemcore.Tmem has not landed yet")


@pytest.mark.parametrize(
    ("abi", "fold", "host_spec", "mode"),
    [
        ("v1", "xxh64", "auto", "v1"),
        ("v0", "xxh64", "auto", "v0-xxh64"),
        ("v0", "ino", "auto", "v0-ino"),
        ("auto", "xxh64", "v0", "v0-xxh64"),
        ("auto", "xxh64", "both", "v1"),
        ("v1", "xxh64", "v0", "passthrough"),
        ("v0", "xxh64", "v1", "passthrough"),
    ],
)
@pytest.mark.usefixtures("needs_host")
def test_modes(abi: str, fold: str, host_spec: str, mode: str) -> None:
    stack = build_stack(StackConfig(page_cache_pages=4, tmem_pages=64, abi=abi, fold=fold, host_spec=host_spec))
    try:
        assert stack.cleancache.mode == mode and stack.stats()["mode"] == mode
        stack.check()
    finally:
        stack.close()


@pytest.mark.usefixtures("needs_host")
def test_reads_through_the_stack_and_stats(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = os.urandom(20 * 4096 + 3)
    path.write_bytes(data)
    stack = build_stack(StackConfig(page_cache_pages=4, tmem_pages=64))
    fd = os.open(path, os.O_RDONLY)
    try:
        key = key_for_fd(fd)
        for _ in range(3):
            assert stack.pageio.read(key, fd, 0, len(data)) == data
        s = stack.stats()
        assert s["succ_gets"] > 0 and s["backing_bytes_read"] == len(data)
        assert isinstance(s["host"], dict)
        stack.check()
    finally:
        os.close(fd)
        stack.close()
    assert stack.cleancache.mode == "passthrough"
    stack.close()  # idempotent


@pytest.mark.usefixtures("needs_host")
def test_compression_option_builds() -> None:
    stack = build_stack(StackConfig(page_cache_pages=1, tmem_pages=16, compress=True))
    try:
        stack.cleancache.put_page(KEY, 0, b"a" * 4096)
        assert stack.cleancache.get_page(KEY, 0) == b"a" * 4096
    finally:
        stack.close()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("page_cache_pages", 0, "page_cache_pages"),
        ("tmem_pages", 0, "tmem_pages"),
        ("abi", "v9", "abi must be"),
        ("fold", "md5", "fold must be"),
        ("host_spec", "v2", "host_spec"),
        ("client_id", 0, "client_id"),
        ("readahead_pages", -1, "readahead_pages"),
    ],
)
def test_bad_config_is_one_line_error(field: str, value: object, message: str) -> None:
    config = StackConfig()
    setattr(config, field, value)
    with pytest.raises(ValueError, match=message):
        build_stack(config)
