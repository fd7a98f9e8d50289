"""Where a pool's page descriptors (and with them the page bytes) are kept.

A store is the pool's object table: a mapping ``oid -> {index -> page descriptor}``. The
pool uses only ``get``, ``__setitem__``, ``pop``, ``__delitem__``, ``__len__``,
``__contains__``, ``__iter__``, ``items`` and ``values``, so any mapping with those can
stand in (a memcached-backed store would keep the index dicts local and the page bytes
remote). ``MemoryStore`` (RAM, a plain dict) is the default.
"""

from __future__ import annotations

from .memory import MemoryStore, PageStore

__all__ = ["MemoryStore", "PageStore"]
