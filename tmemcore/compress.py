"""Page compression (Xen's per-client ``tmem_compress``), here with lz4 block format.

Xen compresses a whole page with LZO1X-1 into a per-CPU buffer and stores the result only
if it is non-empty and smaller than the sub-page allocator's largest allocation; otherwise
the page is stored uncompressed and ``compress_poor`` is counted. We keep that rule with
lz4 (a dependency of the project) and a fixed threshold standing in for
``xmem_pool_maxalloc``.
"""

from __future__ import annotations

import lz4.block

from .abi import PAGE_SIZE

POOR_COMPRESSION_LIMIT = PAGE_SIZE - 64
"""A compressed page of this many bytes or more is "poor" and stored raw (Xen's
``size >= tmem_subpage_maxsize()``; the xmem pool's header overhead is ~64 bytes)."""


class CompressedPage(bytes):
    """lz4 block data of one page. A ``bytes`` subclass so it can be told from a raw page
    with ``type(x) is bytes`` on the hot path, at no memory cost."""

    __slots__ = ()


def compress_page(data: bytes) -> CompressedPage | None:
    """The compressed form of a full page, or None when compression is poor."""
    packed = lz4.block.compress(data, mode="fast", store_size=False)
    if not packed or len(packed) >= POOR_COMPRESSION_LIMIT:
        return None
    return CompressedPage(packed)


def decompress_page(packed: bytes) -> bytes:
    return lz4.block.decompress(packed, uncompressed_size=PAGE_SIZE)
