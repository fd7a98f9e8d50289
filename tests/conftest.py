"""Shared fixtures for the whole test suite (kept small on purpose)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# pytest puts tests/ on sys.path (rootdir conftest), where tests/guestfs and tests/tmemcore would be
# picked up as namespace packages ahead of the editable install's finder; the real packages must win.
if sys.path[0] != str(REPO_ROOT):
    sys.path.insert(0, str(REPO_ROOT))


def traces_dir_or_none() -> Path | None:
    """The shared real traces: $TMEM_TRACES, else ``shared/traces`` beside the repo root's parent."""
    candidates = [os.environ.get("TMEM_TRACES"), REPO_ROOT / ".." / "shared" / "traces"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate).resolve()
    return None


@pytest.fixture
def traces_dir() -> Path:
    found = traces_dir_or_none()
    if found is None:
        pytest.skip("real traces not found: set TMEM_TRACES or provide ../shared/traces beside the repo")
    return found
