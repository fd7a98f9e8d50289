"""guestfs --server: the second-chance cache lives in a separate tmemd process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.polling import wait_for

from guestfs.pageio import wait_until_cacheable

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120, method="thread")]

MountFactory = Callable[..., Any]


@pytest.fixture
def tmemd(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A tmemd on a unix socket in tmp_path (flags from the indirect param, default a v1 host); (process, address)."""
    flags = getattr(request, "param", ["--spec", "v1"])
    ready = tmp_path / "tmemd.ready"
    process = subprocess.Popen([sys.executable, "-m", "tmemcore.server", "--listen", f"unix:{tmp_path}/tmemd.sock",
                                "--memory", "16M", *flags, "--ready-file", str(ready)],
                               stdout=subprocess.DEVNULL, stderr=(tmp_path / "tmemd.log").open("wb"))
    try:
        deadline = time.monotonic() + 20
        while not (ready.exists() and ready.read_text().strip()):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"tmemd did not start: {(tmp_path / 'tmemd.log').read_text()[-500:]}")
            time.sleep(0.02)
        yield process, ready.read_text().strip()
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def read_twice(root: Path, names: list[str]) -> dict[str, bytes]:
    return {name: (root / name).read_bytes() for _ in range(2) for name in names}


def test_mount_against_tmemd_hits_and_survives_its_death(mount_factory: MountFactory, tmp_path: Path,
                                                         tmemd: tuple[subprocess.Popen[bytes], str]) -> None:
    process, address = tmemd
    source = tmp_path / "data"
    source.mkdir()
    blobs = {f"f{index}": os.urandom(64 * 1024) for index in range(4)}
    for name, blob in blobs.items():
        (source / name).write_bytes(blob)
    wait_until_cacheable(source)  # written behind the mount: cached once it settles
    m = mount_factory("--server", address, "--page-cache", "32K", source=source)
    assert read_twice(m.mnt, list(blobs)) == blobs
    stats = m.stats()
    assert stats["server"] == address and stats["mode"] == "v1" and stats["succ_gets"] > 0, stats

    process.terminate()
    process.wait(timeout=10)
    assert read_twice(m.mnt, list(blobs)) == blobs  # a dead host turns hits into misses, never into errors
    assert m.stats()["transport_errors"] > 0


@pytest.mark.parametrize("tmemd", [["--spec", "v0"]], indirect=True)
def test_abi_auto_falls_back_to_v0_on_an_old_host(mount_factory: MountFactory, tmp_path: Path,
                                                  tmemd: tuple[subprocess.Popen[bytes], str]) -> None:
    _, address = tmemd
    m = mount_factory("--server", address, "--page-cache", "8K")
    (m.source / "f").write_bytes(b"v0" * 20000)
    wait_until_cacheable(m.source / "f")
    assert read_twice(m.mnt, ["f"]) == {"f": b"v0" * 20000}
    stats = m.stats()
    assert stats["mode"] == "v0-xxh64" and stats["succ_gets"] > 0, stats


def tmemctl_list(address: str) -> str:
    result = subprocess.run([sys.executable, "-m", "tmemcore.cli", "--server", address, "list"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout




@pytest.mark.parametrize("tmemd", [["--accept-v0"]], indirect=True)
def test_v1_and_v0_mounts_share_one_tmemd_as_different_clients(mount_factory: MountFactory,
                                                                tmemd: tuple[subprocess.Popen[bytes], str]) -> None:
    _, address = tmemd
    v1 = mount_factory("--server", address, "--abi", "v1", "--page-cache", "8K")
    v0 = mount_factory("--server", address, "--abi", "v0", "--page-cache", "8K")
    for m in (v1, v0):
        (m.source / "f").write_bytes(b"ab" * 20000)
        wait_until_cacheable(m.source / "f")
        assert read_twice(m.mnt, ["f"]) == {"f": b"ab" * 20000}
    s1, s0 = v1.stats(), v0.stats()
    assert (s1["mode"], s0["mode"]) == ("v1", "v0-xxh64"), (s1, s0)  # neither fell back to passthrough
    assert s1["succ_gets"] > 0 and s0["succ_gets"] > 0
    assert {s1["client_id"], s0["client_id"]} == {1, 2}
    listing = tmemctl_list(address)
    assert f"P=CI:{s1['client_id']},PI:0" in listing and f"P=CI:{s0['client_id']},PI:0" in listing


def test_kill_9_of_a_mount_destroys_its_pools_on_the_server(mount_factory: MountFactory,
                                                            tmemd: tuple[subprocess.Popen[bytes], str]) -> None:
    _, address = tmemd
    victim = mount_factory("--server", address, "--page-cache", "8K")
    survivor = mount_factory("--server", address, "--page-cache", "8K", "--client-id", "7")
    victim_id = victim.stats()["client_id"]
    assert victim_id == 1 and survivor.stats()["client_id"] == 7
    assert f"P=CI:{victim_id},PI:0" in tmemctl_list(address)
    victim.handle.process.kill()
    victim.handle.process.wait(timeout=15)
    assert wait_for(lambda: f"P=CI:{victim_id}," not in tmemctl_list(address), timeout=15), tmemctl_list(address)
    assert "P=CI:7,PI:0" in tmemctl_list(address)  # the other guest keeps its pool
    again = mount_factory("--server", address, "--page-cache", "8K")  # the dead guest's id is free again
    assert again.stats()["client_id"] == victim_id and again.stats()["mode"] == "v1"
