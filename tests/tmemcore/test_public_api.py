"""tmemcore.__all__ is exactly the public API, sorted."""

from __future__ import annotations

import tmemcore


def test_all_is_sorted_and_exact() -> None:
    assert tmemcore.__all__ == sorted(tmemcore.__all__)
    public = {name for name in vars(tmemcore) if not name.startswith("_")}
    modules = {name for name in public if type(getattr(tmemcore, name)).__name__ == "module"}
    assert set(tmemcore.__all__) == public - modules
    assert tmemcore.__all__ == [
        "Client", "INVALID_OID", "Oid", "PAGE_SIZE", "Pool", "SPEC_V0", "SPEC_V1", "Tmem", "TmemError", "TmemOp",
    ]  # fmt: skip
