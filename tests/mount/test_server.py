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

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120, method="thread")]

MountFactory = Callable[..., Any]


@pytest.fixture
def tmemd(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A tmemd on a unix socket in tmp_path (spec from the indirect param, default v1); (process, address)."""
    spec = getattr(request, "param", "v1")
    ready = tmp_path / "tmemd.ready"
    process = subprocess.Popen([sys.executable, "-m", "tmemcore.server", "--listen", f"unix:{tmp_path}/tmemd.sock",
                                "--memory", "16M", "--spec", spec, "--ready-file", str(ready)],
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
    m = mount_factory("--server", address, "--page-cache", "32K", source=source)
    assert read_twice(m.mnt, list(blobs)) == blobs
    stats = m.stats()
    assert stats["server"] == address and stats["mode"] == "v1" and stats["succ_gets"] > 0, stats

    process.terminate()
    process.wait(timeout=10)
    assert read_twice(m.mnt, list(blobs)) == blobs  # a dead host turns hits into misses, never into errors
    assert m.stats()["transport_errors"] > 0


@pytest.mark.parametrize("tmemd", ["v0"], indirect=True)
def test_abi_auto_falls_back_to_v0_on_an_old_host(mount_factory: MountFactory, tmp_path: Path,
                                                  tmemd: tuple[subprocess.Popen[bytes], str]) -> None:
    _, address = tmemd
    m = mount_factory("--server", address, "--page-cache", "8K")
    (m.source / "f").write_bytes(b"v0" * 20000)
    assert read_twice(m.mnt, ["f"]) == {"f": b"v0" * 20000}
    stats = m.stats()
    assert stats["mode"] == "v0-xxh64" and stats["succ_gets"] > 0, stats
