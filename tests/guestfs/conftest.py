"""In-process guest tests write their backing files just before reading them."""

from __future__ import annotations

import pytest

import guestfs.pageio as pageio_module


@pytest.fixture(autouse=True)
def files_settle_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """PageIO does not cache what it reads within RACY_NS of a file's last external change (a
    writer may still be copying): these tests write a file and read it at once, so they run with
    no such window. tests/guestfs/test_pageio.py's racing-writer tests restore the real one, and
    the mount tests run real daemons with it (waiting with ``wait_until_cacheable``)."""
    monkeypatch.setattr(pageio_module, "RACY_NS", 0)
