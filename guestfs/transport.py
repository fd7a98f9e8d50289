"""Transports: how the guest's tmem_op records reach a host (the frontend/backend split).

A transport carries one raw record (56-byte v1 or 40-byte v0, built with ``tmemcore.abi``)
plus, for puts and gets, one 4096-byte page buffer (a ``bytearray``; a put may also pass an
immutable ``bytes`` page, which the host may keep without copying), and returns the host's integer result
(1 hit/success, 0 miss, negative errno). ``call`` raises ``OSError`` (ConnectionError,
TimeoutError, ...) only when the transport itself failed; the cleancache frontend turns that
into a miss and switches itself off (it can no longer prove its flushes reached the host).

``InProcessTransport``  calls ``tmemcore.Tmem.do_tmem_op`` directly (the embedded host).
``SocketTransport``     talks to a ``tmemd`` server through ``tmemcore.wire.RemoteTmem``
                        (connected when built; ``ServerUnreachable`` if it cannot be).
``NullTransport``       no host at all: every op answers -ENODEV, so NEW_POOL fails and the
                        frontend runs as plain passthrough (the baseline).
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import tmemcore


class Transport(Protocol):
    def call(self, op: bytes, page: bytearray | bytes | None = None) -> int: ...

    def close(self) -> None: ...


class InProcessTransport:
    """The embedded host: one client of an in-process ``tmemcore.Tmem``.

    ``call(op, page=None)`` is an instance attribute: ``functools.partial(tmem.do_tmem_op, client_id)``.
    """

    def __init__(self, tmem: tmemcore.Tmem, client_id: int = 1) -> None:
        self.tmem = tmem
        self.client_id = client_id
        # The hot path: ``call(op, page)`` is ``tmem.do_tmem_op(client_id, op, page)`` with no Python
        # frame of ours in between (a C-level partial bound once; ~0.1 us per hypercall).
        self.call: Callable[..., int] = functools.partial(tmem.do_tmem_op, client_id)

    def close(self) -> None:
        """Nothing to release: the host belongs to whoever built it."""


class ServerUnreachable(ConnectionError):
    """The tmemd at an address cannot be reached; the message is one line naming the address."""


class SocketTransport:
    """A remote host (``tmemd``) at ``tcp:HOST:PORT`` or ``unix:PATH``, connected when built.

    Connecting at once makes an unreachable server an error before a mount (``ServerUnreachable``),
    not a silent passthrough after it. ``client_id=None`` asks the server to assign the lowest
    free id (``tmemcore.wire.CLIENT_ANY``); ``client_id`` then reports the assigned one. Transport
    failures later propagate as ``OSError`` from ``call`` and are counted in ``errors``.
    """

    def __init__(self, address: str, client_id: int | None = None, timeout: float = 2.0) -> None:
        from tmemcore.wire import CLIENT_ANY, RemoteTmem, unreachable  # lazily: only needed here

        self.address = address
        self.errors = 0
        self._remote = RemoteTmem(address, CLIENT_ANY if client_id is None else client_id, timeout)
        try:
            self._remote.connect()
        except OSError as exc:
            raise ServerUnreachable(unreachable(address, exc)) from exc

    @property
    def client_id(self) -> int:
        return self._remote.client_id

    def call(self, op: bytes, page: bytearray | bytes | None = None) -> int:
        try:
            return self._remote.do_tmem_op(op, page)
        except OSError:
            self.errors += 1
            raise

    def close(self) -> None:
        self._remote.close()


class NullTransport:
    """No host: every operation fails with -ENODEV (as Xen does when tmem is not enabled)."""

    def __init__(self) -> None:
        self.calls = 0

    def call(self, op: bytes, page: bytearray | bytes | None = None) -> int:
        self.calls += 1
        return -errno.ENODEV

    def close(self) -> None:
        """Nothing to release."""


class MockTransport:
    """A test double: a tiny host of private ephemeral pools (dicts; gets are exclusive).

    ``spec_versions`` are the NEW_POOL versions it accepts (others get -EPERM, as a real
    host with another TMEM_SPEC_VERSION answers). ``fail_after`` makes every call after that
    many raise ``ConnectionError`` (a dead server). ``ops`` counts calls per command name.
    """

    def __init__(self, spec_versions: tuple[int, ...] = (1,), fail_after: int | None = None) -> None:
        self.spec_versions = spec_versions
        self.fail_after = fail_after
        self.pools: dict[int, dict[tuple[int, int], bytes]] = {}
        self.ops: dict[str, int] = {}
        self.calls = 0

    def call(self, op: bytes, page: bytearray | bytes | None = None) -> int:
        from tmemcore import abi

        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise ConnectionError("mock tmem host is gone")
        record = abi.TmemOp.decode(op)
        name = abi.CMD_NAMES.get(record.cmd, str(record.cmd))
        self.ops[name] = self.ops.get(name, 0) + 1
        if record.cmd == abi.TMEM_NEW_POOL:
            if abi.flags_version(record.flags) not in self.spec_versions or abi.version_of_record(op) != abi.flags_version(record.flags):
                return -errno.EPERM
            pool_id = min(set(range(abi.MAX_POOLS_PER_DOMAIN)) - set(self.pools))
            self.pools[pool_id] = {}
            return pool_id
        pool = self.pools.get(record.pool_id)
        if pool is None:
            return -errno.ENODEV
        handle = (int(record.oid), record.index)
        if record.cmd == abi.TMEM_PUT_PAGE:
            assert page is not None and len(page) == abi.PAGE_SIZE
            pool[handle] = bytes(page)
            return 1
        if record.cmd == abi.TMEM_GET_PAGE:
            assert page is not None
            data = pool.pop(handle, None)
            if data is None:
                return 0
            page[:] = data
            return 1
        if record.cmd == abi.TMEM_FLUSH_PAGE:
            pool.pop(handle, None)
            return 1
        if record.cmd == abi.TMEM_FLUSH_OBJECT:
            for gone in [h for h in pool if h[0] == handle[0]]:
                del pool[gone]
            return 1
        if record.cmd == abi.TMEM_DESTROY_POOL:
            del self.pools[record.pool_id]
            return 1
        return -errno.ENOSYS

    def close(self) -> None:
        """Nothing to release."""
