"""Where a pool's pages are kept.

Two separate choices:

* the **object table** (``Tmem(store_factory=...)``): a mapping ``oid -> {index -> page
  descriptor}`` per pool. The pool uses only ``get``, ``__setitem__``, ``pop``,
  ``__delitem__``, ``__len__``, ``__contains__``, ``__iter__``, ``items`` and ``values``, so any
  mapping with those can stand in. ``MemoryStore`` (RAM, a plain dict) is the default.
* where **ephemeral page bytes** live (``Tmem(store=...)``): ``"memory"`` (default: in the
  descriptor) or ``"memcached://HOST:PORT"`` (``MemcachedPages``: raw ephemeral page bytes in
  memcached, which may drop them; persistent, compressed and deduplicated pages stay in RAM).
  A ``MemcachedPages`` instance may also be passed directly.
"""

from __future__ import annotations

from .memory import MemoryStore, PageStore
from .memcached import MemcachedPages, RemotePage, parse_memcached_url

__all__ = ["MemcachedPages", "MemoryStore", "PageStore", "RemotePage", "open_page_bytes", "parse_memcached_url"]

MEMORY = "memory"


def open_page_bytes(store: "str | MemcachedPages") -> MemcachedPages | None:
    """The remote keeper for ``Tmem(store=...)``, or None for RAM. Raises InvalidArgument."""
    if isinstance(store, MemcachedPages):
        return store
    if store == MEMORY:
        return None
    if isinstance(store, str) and store.startswith("memcached:"):
        return MemcachedPages.from_url(store)
    from ..errors import InvalidArgument

    raise InvalidArgument(f"store must be 'memory' or 'memcached://HOST:PORT', got {store!r}")
