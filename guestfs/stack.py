"""Build the whole guest cache stack: host (embedded or tmemd) -> transport -> CleanCache -> PageIO.

Used by the mount, the lab and the demo::

    stack = build_stack(StackConfig(page_cache_pages=256, tmem_pages=16384, abi="auto"))
    data = stack.pageio.read(key, fd, 0, 4096)
    stack.close()                        # DESTROY_POOL, close the transport

``host_spec`` picks the embedded host's ABI: ``v1`` (a Xen 4.0.2+/4.1 host), ``v0`` (a Xen
4.0.0/4.0.1 host), ``both`` (accepts v0 and v1 per client), ``auto`` (a v1 host that also
accepts v0 when ``abi == "v0"``, so ``--abi v0`` works out of the box).

With ``server`` the stack connects to the tmemd before anything else and raises
``ServerUnreachable`` (one line, naming the address) if it cannot: an unreachable host is a
configuration error, unlike a reachable host that refuses the ABI (``abi="auto"`` then runs as
passthrough, as a guest on a host without tmem does). ``client_id=None`` lets the tmemd assign
the lowest free client id (``tmemcore.wire.CLIENT_ANY``); the embedded host uses client 1.
The connection is the guest's lifetime on the server: when it closes (even by ``kill -9``), the
server destroys the pools it created.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import tmemcore
from tmemcore.abi import SPEC_V0, SPEC_V1

from .cleancache import ABIS, FOLDS, CleanCache
from .pageio import FIRST_CHANCES, PageIO
from .transport import InProcessTransport, SocketTransport, Transport

HOST_SPECS = ("v0", "v1", "both", "auto")
EMBEDDED_CLIENT_ID = 1
SERVER_TIMEOUT = 2.0  # seconds per request to a tmemd (connect included)


@dataclass
class StackConfig:
    page_cache_pages: int = 256  # first-chance cache (pages)
    tmem_pages: int = 16384  # embedded host budget (pages)
    abi: str = "v1"  # v1 | v0 | auto
    fold: str = "xxh64"  # xxh64 | ino
    compress: bool = False  # the embedded host compresses this client's pages (refused with a server)
    host_spec: str = "auto"  # v0 | v1 | both | auto (the embedded host; only "auto" with a server)
    server: str | None = None  # tmemd address ("tcp:127.0.0.1:PORT" | "unix:PATH"); None = embedded
    client_id: int | None = None  # None: 1 on the embedded host, assigned by the tmemd with a server
    readahead_pages: int = 32  # sequential read-ahead (capped at page_cache_pages // 8; none with kernel)
    first_chance: str = "daemon"  # daemon: PageIO's own first-chance cache | kernel: the kernel's page cache
    backing_direct: bool = False  # misses read the backing files with O_DIRECT where the filesystem allows
    attr_timeout: float = 1.0  # the mount's kernel attribute timeout (kernel first chance: see PageIO.kernel_open)

    def validate(self) -> None:
        """Raise ValueError (one line) for a bad setting."""
        if self.page_cache_pages < 1:
            raise ValueError(f"page_cache_pages must be >= 1, got {self.page_cache_pages}")
        if self.tmem_pages < 1:
            raise ValueError(f"tmem_pages must be >= 1, got {self.tmem_pages}")
        if self.abi not in ABIS:
            raise ValueError(f"abi must be one of {', '.join(ABIS)}, got {self.abi!r}")
        if self.fold not in FOLDS:
            raise ValueError(f"fold must be one of {', '.join(FOLDS)}, got {self.fold!r}")
        if self.host_spec not in HOST_SPECS:
            raise ValueError(f"host_spec must be one of {', '.join(HOST_SPECS)}, got {self.host_spec!r}")
        if self.first_chance not in FIRST_CHANCES:
            raise ValueError(f"first_chance must be one of {', '.join(FIRST_CHANCES)}, got {self.first_chance!r}")
        if self.readahead_pages < 0:
            raise ValueError(f"readahead_pages must be >= 0, got {self.readahead_pages}")
        if self.client_id is not None and not 0 < self.client_id < 0xFFFF:
            raise ValueError(f"client_id must be in 1..65534, got {self.client_id}")
        if self.server is not None and (self.compress or self.host_spec != "auto"):
            # both configure the embedded host; a guest cannot set them on a tmemd (SET_COMPRESS is dom0's)
            raise ValueError("compress and host_spec configure the embedded host; they cannot be used with server")


class Stack:
    """The assembled guest stack; ``tmem`` is None when the host is a tmemd server."""

    def __init__(self, config: StackConfig, pageio: PageIO, transport: Transport, tmem: tmemcore.Tmem | None) -> None:
        self.config = config
        self.pageio = pageio
        self.cleancache = pageio.cleancache
        self.transport = transport
        self.tmem = tmem

    @property
    def client_id(self) -> int:
        """The tmem client id this guest speaks as (assigned by the tmemd when asked for any)."""
        if isinstance(self.transport, SocketTransport):
            return self.transport.client_id
        return self.config.client_id or EMBEDDED_CLIENT_ID

    def stats(self) -> dict[str, object]:
        """PageIO + cleancache counters, plus the embedded host's own stats under "host"."""
        out: dict[str, object] = dict(self.pageio.stats())
        out["server"] = self.config.server or ""
        out["client_id"] = self.client_id
        if self.tmem is not None:
            out["host"] = self.tmem.stats()
        return out

    def check(self) -> None:
        self.pageio.check()
        if self.tmem is not None:
            self.tmem.check()

    def close(self) -> None:
        """DESTROY_POOL and close the transport. Idempotent."""
        self.pageio.close()
        self.transport.close()


def embedded_host(config: StackConfig) -> tmemcore.Tmem:
    spec = config.host_spec
    if spec == "auto":
        spec = "both" if config.abi == "v0" else "v1"
    if spec == "both":
        return tmemcore.Tmem(config.tmem_pages, accept_v0=True, spec_version=SPEC_V1, compress=config.compress)
    version = SPEC_V0 if spec == "v0" else SPEC_V1
    return tmemcore.Tmem(config.tmem_pages, spec_version=version, compress=config.compress)


def probe_server(address: str, client_id: int | None = None, timeout: float = SERVER_TIMEOUT) -> None:
    """Connect to the tmemd at ``address`` and hang up; ServerUnreachable (one line) if that fails."""
    SocketTransport(address, client_id, timeout).close()


def _private_shared_uuid() -> tuple[int, int]:
    """A fresh random uuid for a shared pool this guest alone uses. Behind the kernel's page cache
    tmem must be inclusive, so its gets must not be exclusive: Xen's shared ephemeral pools are the
    pools with non-exclusive gets. 128 random bits: no other guest names it by chance."""
    lo, hi = struct.unpack("<QQ", os.urandom(16))
    return lo, hi


def build_stack(config: StackConfig) -> Stack:
    """Host, transport, CleanCache (pool created now) and PageIO, per ``config``.

    Raises ValueError for a bad config and ServerUnreachable when ``config.server`` cannot be reached."""
    config.validate()
    tmem: tmemcore.Tmem | None = None
    transport: Transport
    if config.server is None:
        tmem = embedded_host(config)
        transport = InProcessTransport(tmem, config.client_id or EMBEDDED_CLIENT_ID)
    else:
        transport = SocketTransport(config.server, config.client_id, SERVER_TIMEOUT)
    cleancache = CleanCache(transport, abi=config.abi, fold=config.fold, max_tracked_pages=max(4 * config.tmem_pages, 1024),
                            shared_uuid=_private_shared_uuid() if config.first_chance == "kernel" else None)
    cleancache.init_fs()
    pageio = PageIO(config.page_cache_pages, cleancache, readahead_pages=config.readahead_pages,
                    first_chance=config.first_chance, backing_direct=config.backing_direct,
                    attr_timeout=config.attr_timeout)
    return Stack(config, pageio, transport, tmem)
