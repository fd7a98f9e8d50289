"""Ephemeral page bytes in memcached (``Tmem(store="memcached://HOST:PORT")``).

The host keeps every page descriptor, the object tables, the FIFOs, the budget and all
counters in RAM, exactly as with the memory store; only the 4 KiB of a raw *ephemeral* page
goes to memcached, and the descriptor holds a ``RemotePage`` (its key) instead of the bytes.
Persistent pages, compressed pages and deduplicated contents always stay in RAM.

Why this is safe for tmem: memcached may drop any item at any time (its own LRU, a restart,
a dead server), and an ephemeral page may be lost at any time too -- a lost page is a *miss*,
never wrong bytes. Each put gets a key of its own (a per-host random prefix plus a counter
that never repeats), so a value left over from an older put of the same handle, or from
another host sharing the server, can never be read as the current page.

A server that stops answering makes puts "succeed" (the page is simply lost at once, as
memcached could have dropped it a moment later) and gets miss; it never raises into the
host. After a failure the server is not asked again for ``retry_after`` seconds, so a dead
server costs one timeout per ``retry_after``, not one per op (ops run under the host lock).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any
from urllib.parse import urlsplit

from ..abi import PAGE_SIZE
from ..errors import InvalidArgument

LOG = logging.getLogger("tmemd.store")

SCHEME = "memcached"
DEFAULT_TIMEOUT = 0.5  # seconds, connect and per-request
DEFAULT_RETRY_AFTER = 1.0  # seconds the server is left alone after a failure


class RemotePage:
    """A descriptor's stored form for a page held in memcached: just its unique key.

    ``len()`` is what the page costs against the host budget (a full page, as in RAM:
    the budget models tmem's memory, wherever the bytes physically are)."""

    __slots__ = ("key",)

    def __init__(self, key: bytes) -> None:
        self.key = key

    def __len__(self) -> int:
        return PAGE_SIZE

    def __repr__(self) -> str:
        return f"RemotePage({self.key!r})"


def parse_memcached_url(url: str) -> tuple[str, int]:
    """``memcached://HOST:PORT`` -> (host, port); InvalidArgument with a one-line reason."""
    parts = urlsplit(url)
    if parts.scheme != SCHEME or not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise InvalidArgument(f"a memcached store is memcached://HOST:PORT, got {url!r}")
    try:
        port = parts.port
    except ValueError as exc:
        raise InvalidArgument(f"bad port in {url!r}: {exc}") from None
    if port is None:
        raise InvalidArgument(f"a memcached store needs an explicit port: {url!r}")
    return parts.hostname, port


class MemcachedPages:
    """Keeps raw ephemeral page bytes in one memcached server. Counters count outcomes."""

    def __init__(self, host: str, port: int, *, timeout: float = DEFAULT_TIMEOUT,
                 retry_after: float = DEFAULT_RETRY_AFTER) -> None:
        try:
            from pymemcache.client.base import Client as MemcacheClient
            from pymemcache.exceptions import MemcacheError
        except ImportError:  # the optional extra is missing
            raise InvalidArgument(
                "the memcached store needs pymemcache: pip install 'tmem-guestfs[memcached]' (or pymemcache)"
            ) from None
        self.address = (host, port)
        self.url = f"{SCHEME}://{host}:{port}"
        self.retry_after = retry_after
        self._client = MemcacheClient(self.address, connect_timeout=timeout, timeout=timeout, no_delay=True)
        self._failures: tuple[type[BaseException], ...] = (MemcacheError, OSError)
        # unique per host instance: keys never collide with another host on the same server
        self._prefix = b"tmem:" + os.urandom(8).hex().encode() + b":"
        self._next_token = 0
        self._down_until = 0.0
        self.live = 0  # RemotePages handed out and not yet forgotten
        self.puts = self.put_failures = 0
        self.gets = self.hits = self.lost = self.get_failures = 0
        self.deletes = self.delete_failures = 0

    @classmethod
    def from_url(cls, url: str, **options: Any) -> "MemcachedPages":
        host, port = parse_memcached_url(url)
        return cls(host, port, **options)

    def __repr__(self) -> str:
        return f"MemcachedPages({self.url}, live={self.live})"

    # --- the three operations the page codec uses ---------------------------------------------

    def keep(self, data: bytes) -> RemotePage:
        """Store a page under a fresh key. Never fails: if the server cannot take it, the
        page is lost at once (a later get misses), which ephemeral semantics allow."""
        self._next_token += 1
        page = RemotePage(self._prefix + str(self._next_token).encode())
        self.live += 1
        self.puts += 1
        if not self._available():
            self.put_failures += 1
            return page
        try:
            self._client.set(page.key, data, noreply=True)  # ordered before any later get on this connection
        except self._failures as exc:
            self.put_failures += 1
            self._mark_down(exc)
            return page
        self._mark_up()
        return page

    def fetch(self, page: RemotePage) -> bytes | None:
        """The page's bytes, or None if memcached no longer has them (or cannot be asked)."""
        self.gets += 1
        if not self._available():
            self.get_failures += 1
            return None
        try:
            data = self._client.get(page.key)
        except self._failures as exc:
            self.get_failures += 1
            self._mark_down(exc)
            return None
        self._mark_up()
        if data is None or len(data) != PAGE_SIZE:
            self.lost += 1
            return None
        self.hits += 1
        return bytes(data)

    def forget(self, page: RemotePage) -> None:
        """The descriptor is gone: delete the item (best effort; a leftover item is harmless,
        its key is never used again and memcached ages it out)."""
        self.live -= 1
        self.deletes += 1
        if not self._available():
            self.delete_failures += 1
            return
        try:
            self._client.delete(page.key, noreply=True)
        except self._failures as exc:
            self.delete_failures += 1
            self._mark_down(exc)
            return
        self._mark_up()

    # --- server health ---------------------------------------------------------------------------

    def _available(self) -> bool:
        return not self._down_until or time.monotonic() >= self._down_until

    def _mark_down(self, exc: BaseException) -> None:
        if not self._down_until:  # the first failure of an outage: say so once, not per page
            LOG.warning("memcached store %s failed (%s): its pages miss until it answers; retrying every %g s",
                        self.url, str(exc) or type(exc).__name__, self.retry_after)
        self._down_until = time.monotonic() + self.retry_after
        self._client.close()  # reconnect on the next attempt

    def _mark_up(self) -> None:
        if self._down_until:
            self._down_until = 0.0
            LOG.warning("memcached store %s answers again", self.url)

    def close(self) -> None:
        self._client.close()

    def stats(self) -> dict[str, Any]:
        return {
            "kind": SCHEME,
            "url": self.url,
            "live_pages": self.live,
            "puts": self.puts,
            "put_failures": self.put_failures,
            "gets": self.gets,
            "hits": self.hits,
            "lost": self.lost,
            "get_failures": self.get_failures,
            "deletes": self.deletes,
            "delete_failures": self.delete_failures,
        }

    def check(self, remote_pages: int) -> None:
        """``remote_pages``: RemotePage descriptors the host holds."""
        assert self.live == remote_pages, f"{self!r}: {self.live} live keys, host holds {remote_pages}"
        assert self.hits + self.lost + self.get_failures == self.gets, f"{self!r}: get outcomes do not add up"
