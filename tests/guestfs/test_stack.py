"""build_stack: the whole guest stack over the embedded host."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from guestfs.filekey import FileKey, key_for_fd
from guestfs.stack import StackConfig, build_stack
from tests.polling import wait_for

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


# ---------------------------------------------------------------- a tmemd host (in-process server)


@pytest.fixture
def tmemd(tmp_path: Path):
    """A real tmemcore.Tmem served by TmemServer on a unix socket; yields (host, server, address)."""
    import tmemcore
    from tmemcore.server import TmemServer

    host = tmemcore.Tmem(256, accept_v0=True)
    server = TmemServer(host, f"unix:{tmp_path}/tmemd.sock")
    address = server.start()
    try:
        yield host, server, address
    finally:
        server.stop()




def live_pools(host, client_id: int) -> list[int]:
    client = host.clients.get(client_id)
    return [] if client is None else [slot for slot, pool in enumerate(client.pools) if pool is not None]


def test_unreachable_server_is_an_error_not_a_passthrough(tmp_path: Path) -> None:
    from guestfs.transport import ServerUnreachable

    address = f"unix:{tmp_path}/none.sock"
    for abi in ("auto", "v1"):
        with pytest.raises(ServerUnreachable) as info:
            build_stack(StackConfig(server=address, abi=abi))
        assert str(info.value) == f"cannot reach tmemd at {address}: No such file or directory"


def test_embedded_host_options_are_refused_with_a_server() -> None:
    for field, value in (("compress", True), ("host_spec", "both")):
        config = StackConfig(server="unix:/run/tmemd.sock")
        setattr(config, field, value)
        with pytest.raises(ValueError, match="cannot be used with server"):
            build_stack(config)


def test_embedded_client_id_defaults_to_1_and_follows_the_config() -> None:
    for client_id, expected in ((None, 1), (9, 9)):
        stack = build_stack(StackConfig(page_cache_pages=1, tmem_pages=16, client_id=client_id))
        try:
            assert stack.client_id == expected and stack.stats()["client_id"] == expected
            assert live_pools(stack.tmem, expected) == [0]
        finally:
            stack.close()


def test_server_assigns_distinct_client_ids_so_v0_and_v1_guests_coexist(tmemd) -> None:
    host, server, address = tmemd
    v1 = build_stack(StackConfig(page_cache_pages=1, server=address, abi="v1"))
    v0 = build_stack(StackConfig(page_cache_pages=1, server=address, abi="v0"))
    explicit = build_stack(StackConfig(page_cache_pages=1, server=address, abi="v1", client_id=40))
    try:
        assert (v1.cleancache.mode, v0.cleancache.mode, explicit.cleancache.mode) == ("v1", "v0-xxh64", "v1")
        assert (v1.client_id, v0.client_id, explicit.client_id) == (1, 2, 40)
        assert v0.stats()["client_id"] == 2
        assert live_pools(host, 1) == live_pools(host, 2) == live_pools(host, 40) == [0]
        server.check()
    finally:
        for stack in (v1, v0, explicit):
            stack.close()


def test_a_dropped_connection_destroys_its_pools_and_frees_its_id(tmemd) -> None:
    host, server, address = tmemd
    stack = build_stack(StackConfig(page_cache_pages=1, server=address, abi="v1"))
    stack.cleancache.put_page(KEY, 0, b"p" * 4096)
    assert live_pools(host, 1) == [0] and host.npages == 1
    stack.transport.close()  # a crash: no DESTROY_POOL was sent, the socket just closes
    assert wait_for(lambda: live_pools(host, 1) == [] and server.client_ids() == {})
    assert host.npages == 0
    again = build_stack(StackConfig(page_cache_pages=1, server=address, abi="v0"))  # the freed id, another ABI
    try:
        assert again.client_id == 1 and again.cleancache.mode == "v0-xxh64"
    finally:
        again.close()
        stack.close()
