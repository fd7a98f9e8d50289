"""guestfs exposes a short, sorted, typed public API, and importing it never loads a FUSE binding."""

from __future__ import annotations

import subprocess
import sys
import types

import guestfs


def test_all_is_sorted_and_exactly_the_public_names() -> None:
    assert guestfs.__all__ == sorted(guestfs.__all__)
    public = {name for name, value in vars(guestfs).items()
              if not name.startswith("_") and not isinstance(value, types.ModuleType) and name != "annotations"}
    assert public == set(guestfs.__all__)


def test_every_exported_name_resolves() -> None:
    for name in guestfs.__all__:
        assert getattr(guestfs, name) is not None


def test_import_does_not_load_a_fuse_binding() -> None:
    code = "import sys, tmemcore, guestfs, guestfs.cli; print(sorted(m for m in sys.modules if 'fuse' in m and m != 'guestfs'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert [name for name in eval(result.stdout) if not name.startswith("guestfs")] == []
