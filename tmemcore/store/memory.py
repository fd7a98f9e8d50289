"""The default page store: RAM, as a plain dict (no per-page overhead beyond the dict entry)."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, Callable

PageStore = MutableMapping[int, dict[int, list[Any]]]
"""oid -> {index -> page descriptor}; see tmemcore/page.py for the descriptor layout."""

StoreFactory = Callable[[], PageStore]


class MemoryStore(dict):  # type: ignore[type-arg]
    """Page descriptors in process memory. A dict subclass so lookups stay C-speed."""

    __slots__ = ()
