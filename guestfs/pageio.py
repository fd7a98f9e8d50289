"""PageIO: byte ranges <-> 4 KiB pages; the facade the FUSE handlers call.

A read fstat()s the backing file (once per request), revalidates the file's cached pages
against (size, mtime_ns, ctime_ns), then serves its pages from the first-chance cache, else
tmem, else one ``pread`` per run of missing pages, and cuts the result at the current file size
(tmem pages are zero-padded 4096-byte pages; bytes past EOF are never returned). The work is
done a request at a time, not a page at a time: one lock hold and one pass over the request's
pages (``PageCache.lookup_run``, ``CleanCache.get_pages``), one ``insert_many`` for what was
loaded, and one ``join`` into the reply.

Read-ahead: when a read starts where the file's previous read ended and its last page misses,
up to ``readahead_pages`` following pages (not cached anywhere, before EOF) are read in the same
``pread`` and cached, not returned. It is capped at 1/8 of the first-chance cache so prefetched
pages are not pushed to tmem before use. Measured on cold sequential 4 KiB reads through PageIO
(no FUSE): 15-40 % more throughput with 32 pages (6-12 vs 9-17 us per page).

Coherence -- what is guaranteed:

* Writes through PageIO go to the backing file first, then drop the touched pages (and the old
  partial last page when the file grows) from the first-chance cache and FLUSH them in tmem,
  then bump the file's generation and record the new validators.
* Truncate and forget drop all of the file's pages (first-chance + FLUSH_OBJECT).
* External changes behind the mount are noticed from size/mtime_ns/ctime_ns on every read
  (fstat) and on ``revalidate`` (open); they drop all of the file's pages.
* Read/write race: a reader that loaded pages from the backing file inserts them only if the
  file's generation is unchanged since it revalidated (checked under the lock), so bytes read
  before a concurrent write's invalidation are never cached after it.
* Only clean pages (just read from the backing file, or got back from tmem) are ever cached or
  put; a page is never in both the first-chance cache and tmem.
* Racing external writers: a write(2) stamps the file's ctime/mtime *before* it copies its bytes
  in, so a page read while another process's write is still copying can hold old bytes under the
  new stamps, which would then validate it for good. Pages read while the file's ctime is less than
  ``RACY_NS`` old are therefore served but not cached (``racy_pages_not_cached``), unless the stamp
  is our own completed write's (its bytes were in before we recorded it).

What is NOT guaranteed: an external same-size rewrite within one timestamp tick (both mtime and
ctime unchanged at ns resolution on the filesystem's coarse clock) is not detected; an external
change that lands between a write's two fstats (before and after its pwrite) is taken for our own
write (and so is an external write still copying when one of ours completes); an external write(2)
still copying more than ``RACY_NS`` after it began can leave pages read meanwhile cached; a process
that writes the backing file through its own shared mapping changes bytes without changing size,
mtime or ctime (after its first store, until writeback), which no stat can see; and on a backing file
system whose clock runs behind ours (a remote one) a change looks older than it is. The cache is
as coherent as the validators, like NFS close-to-open, not like a local page cache.

Thread-safe: one lock guards the caches and per-file state; backing I/O runs outside it.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections import Counter

from tmemcore.abi import PAGE_SHIFT, PAGE_SIZE

from .cleancache import CleanCache
from .filekey import FileKey
from .pagecache import KernelFirstChance, PageCache

Validators = tuple[int, int, int]  # st_size, st_mtime_ns, st_ctime_ns
PRUNE_FILES_MIN = 4096  # per-file states kept before the first prune of states that guard no page
# How long after a file's ctime its bytes may still be arriving from a write(2) that stamped it:
# a single write copying for longer (hundreds of MiB at once, or a writer stalled mid-copy) is the
# documented residue. Pages read within it are not cached, so a file changed behind the mount is
# cached from a read at least this long after the change.
RACY_NS = 1_000_000_000


class _FileState:
    """Per-file validators and the generation that orders reads against invalidations."""

    __slots__ = ("validators", "generation", "next_index", "own_stamp", "kernel_validators")

    def __init__(self, validators: Validators | None) -> None:
        self.validators = validators
        self.generation = 0
        self.next_index = -1  # the page after the last read's end (sequential detection)
        self.own_stamp = False  # validators recorded after our own write completed (not racy)
        # --first-chance kernel: the validators under which the kernel's cached pages of this file
        # hold the file's bytes (recorded at an open, moved on by our own completed writes); None
        # when nothing is known, so the next open makes the kernel drop them.
        self.kernel_validators: Validators | None = None


def wait_until_cacheable(*paths: str | os.PathLike[str]) -> None:
    """Sleep until each of ``paths`` (files, or directories: everything under them) was last changed
    at least RACY_NS ago, so that reads through a mount may cache it. For whoever just wrote files
    behind a mount and wants them cached from the first read (experiments, tests)."""
    newest = 0
    for path in paths:
        newest = max(newest, os.lstat(path).st_ctime_ns)
        if os.path.isdir(path):
            for parent, _, names in os.walk(path):
                for name in names:
                    newest = max(newest, os.lstat(os.path.join(parent, name)).st_ctime_ns)
    delay = newest + RACY_NS - time.time_ns()
    if delay > 0:
        time.sleep(delay / 1e9)


def validators_of(st: os.stat_result) -> Validators:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def pread_full(fd: int, count: int, offset: int) -> bytes:
    """Up to ``count`` bytes at ``offset`` (fewer only at EOF); loops over short reads."""
    data = os.pread(fd, count, offset)
    if len(data) == count or not data:
        return data
    parts = [data]
    got = len(data)
    while got < count:
        more = os.pread(fd, count - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def pread_direct(fd: int, count: int, offset: int) -> bytes:
    """``pread_full`` into a page-aligned buffer, as O_DIRECT needs (``offset`` and ``count`` are
    whole pages here); works the same on a descriptor without O_DIRECT."""
    with mmap.mmap(-1, count) as buffer:  # anonymous mappings are page-aligned
        got = 0
        while got < count:
            done = os.preadv(fd, [memoryview(buffer)[got:]], offset + got)
            if not done:
                break
            got += done
        return buffer[:got]


FIRST_CHANCES = ("daemon", "kernel")


class PageIO:
    """Page-granular, coherent, thread-safe reads and writes over backing file descriptors.

    ``first_chance``: ``daemon`` keeps a first-chance :class:`PageCache` of ``page_cache_pages``
    here (every read reaches the daemon: the mount is direct_io), ``kernel`` leaves the first
    chance to the kernel's page cache (:class:`KernelFirstChance`: tmem is inclusive behind it,
    no read-ahead here, the kernel does its own). ``backing_direct``: misses read through
    page-aligned buffers (``pread_direct``), so the descriptors may be O_DIRECT.
    """

    def __init__(self, page_cache_pages: int, cleancache: CleanCache, *, readahead_pages: int = 32,
                 first_chance: str = "daemon", backing_direct: bool = False, attr_timeout: float = 1.0) -> None:
        if readahead_pages < 0:
            raise ValueError(f"readahead_pages must be >= 0, got {readahead_pages}")
        if first_chance not in FIRST_CHANCES:
            raise ValueError(f"first_chance must be one of {', '.join(FIRST_CHANCES)}, got {first_chance!r}")
        self.cleancache = cleancache
        self.first_chance = first_chance
        self.cache: PageCache | KernelFirstChance
        if first_chance == "kernel":
            self.cache = KernelFirstChance(cleancache)
            self.readahead_pages = 0
        else:
            self.cache = PageCache(page_cache_pages, cleancache)
            # Read ahead only into a first-chance cache big enough that prefetched pages are not
            # evicted (put to tmem, then got back at twice the cost) before they are read.
            self.readahead_pages = min(readahead_pages, page_cache_pages // 8)
        self.backing_direct = backing_direct
        # kernel first chance: how long after a change behind the mount the kernel may still hold
        # the file's old attributes, or a writer may still be copying (see ``kernel_open``)
        self.settle_ns = max(RACY_NS, int(attr_timeout * 1e9))
        self._lock = threading.Lock()
        # Per-file validators exist while a file has pages cached here or tracked in tmem; the states
        # of files with neither are pruned (amortized: when the table doubles), so reading millions of
        # files once does not grow the daemon without bound.
        self._files: dict[FileKey, _FileState] = {}
        self._prune_at = PRUNE_FILES_MIN
        self._keys_by_source: Counter[str] = Counter()
        self.reads = 0
        self.writes = 0
        self.bytes_written = 0
        self.backing_reads = 0
        self.backing_bytes_read = 0
        self.revalidate_drops = 0
        self.stale_inserts_refused = 0
        self.racy_pages_not_cached = 0
        self.readahead_loaded = 0

    # --- reads ------------------------------------------------------------------------------

    def read(self, key: FileKey, fd: int, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset``, never past the current EOF.

        One fstat, one lock hold and one pass over the request's pages (``PageCache.lookup_run``);
        missing pages come from one ``pread`` per run of them, outside the lock.
        """
        if offset < 0 or size < 0:
            raise ValueError(f"read needs offset >= 0 and size >= 0, got offset={offset} size={size}")
        st = os.fstat(fd)
        # See "Racing external writers". A ctime ahead of our clock (a stepped-back clock, a remote
        # backing fs running ahead) counts as not settled: the cost is a miss, never a stale page.
        settled = time.time_ns() - st.st_ctime_ns >= RACY_NS
        file_size = st.st_size
        end = min(offset + size, file_size)
        with self._lock:
            state = self._files.get(key)
            if state is None or state.validators != (file_size, st.st_mtime_ns, st.st_ctime_ns):
                state = self._revalidate_locked(key, st)
            if offset >= end:
                return b""
            self.reads += 1
            first, stop = offset >> PAGE_SHIFT, ((end - 1) >> PAGE_SHIFT) + 1
            generation = state.generation if settled or state.own_stamp else -1  # -1: cache nothing
            pages = self.cache.lookup_run(key, first, stop, file_size)
            wanted = len(pages)
            if pages[-1] is None and first == state.next_index and generation >= 0:  # a sequential reader missed
                pages.extend(None for _ in self._readahead_indexes(key, stop, file_size))
            state.next_index = stop
        if None in pages:
            self._fill_from_backing(key, fd, state, generation, first, pages, wanted)
            del pages[wanted:]
        elif wanted == 1:  # a cached page: slicing a whole page returns it without a copy
            base = first << PAGE_SHIFT
            return pages[0][offset - base : end - base]  # type: ignore[index]
        return _assemble(pages, first, offset, end)

    def _readahead_indexes(self, key: FileKey, start: int, file_size: int) -> range:
        """The pages after ``start`` worth reading ahead: up to EOF, none already cached anywhere."""
        stop = min(start + self.readahead_pages, (file_size + PAGE_SIZE - 1) >> PAGE_SHIFT)
        for index in range(start, stop):
            if self.cache.has_page(key, index) or self.cleancache.holds(key, index):
                return range(start, index)
        return range(start, max(start, stop))

    def _fill_from_backing(
        self,
        key: FileKey,
        fd: int,
        state: _FileState,
        generation: int,
        first: int,
        pages: list[bytes | None],
        wanted: int,
    ) -> None:
        """pread each run of missing pages (outside the lock), then cache them if still current.

        ``pages[wanted:]`` are read-ahead pages: cached, not returned.
        """
        if len(pages) == 1:  # a random read's miss: no runs to look for
            data = self._read_backing(fd, PAGE_SIZE, first << PAGE_SHIFT)
            pages[0] = data
            self._cache_loaded(key, state, generation, [(first, data)] if data else [], 1, len(data), 0)
            return
        loaded: list[tuple[int, bytes]] = []
        preads = bytes_read = 0
        position = 0
        while position < len(pages):
            if pages[position] is not None:
                position += 1
                continue
            run_end = position
            while run_end < len(pages) and pages[run_end] is None:
                run_end += 1
            start_index = first + position
            data = self._read_backing(fd, (run_end - position) << PAGE_SHIFT, start_index << PAGE_SHIFT)
            preads += 1
            bytes_read += len(data)
            for slot in range(position, run_end):
                chunk = data[(slot - position) << PAGE_SHIFT : (slot - position + 1) << PAGE_SHIFT]
                pages[slot] = chunk
                if chunk:
                    loaded.append((first + slot, chunk))
            position = run_end
        self._cache_loaded(key, state, generation, loaded, preads, bytes_read, len(pages) - wanted)

    def _read_backing(self, fd: int, count: int, offset: int) -> bytes:
        return pread_direct(fd, count, offset) if self.backing_direct else pread_full(fd, count, offset)

    def _cache_loaded(
        self,
        key: FileKey,
        state: _FileState,
        generation: int,
        loaded: list[tuple[int, bytes]],
        preads: int,
        bytes_read: int,
        readahead: int,
    ) -> None:
        """Count the backing reads and cache what they loaded, unless the file changed meanwhile
        or ``generation`` is -1 (read within RACY_NS of an external change: served, not cached)."""
        with self._lock:
            self.backing_reads += preads
            self.backing_bytes_read += bytes_read
            self.readahead_loaded += readahead
            if generation < 0:
                self.racy_pages_not_cached += len(loaded)
                return
            if self._files.get(key) is not state or state.generation != generation:
                self.stale_inserts_refused += len(loaded)
                return
            self.cache.insert_many(key, loaded)

    # --- writes and invalidation -------------------------------------------------------------

    def write(self, key: FileKey, fd: int, data: bytes, offset: int, *, append: bool = False) -> int:
        """Write through to the backing file, then make the caches forget what it touched.

        ``append``: ``fd`` was opened O_APPEND, so the bytes land at the backing file's end whatever
        ``offset`` says (the kernel computes it from a size that may be stale); the pages from the old
        end to the new one are the ones touched.
        """
        if offset < 0:
            raise ValueError(f"write needs offset >= 0, got {offset}")
        before = os.fstat(fd)
        with self._lock:
            old_size = self._revalidate_locked(key, before).validators[0]  # type: ignore[index]
        written = 0
        view = memoryview(data)
        try:
            while written < len(view):
                if append:
                    written += os.write(fd, view[written:])
                else:
                    written += os.pwrite(fd, view[written:], offset + written)
        except OSError:
            if not written:
                raise
            # Some bytes landed (e.g. ENOSPC after a short write): report them, as write(2) does, and
            # drop what they touched below; the caller's next write gets the error.
        after = os.fstat(fd)
        start, end = offset, offset + written
        if append:  # from the old end (or where the bytes landed, if smaller) to the new end
            start, end = min(old_size, after.st_size - written), after.st_size
        with self._lock:
            self.writes += 1
            self.bytes_written += written
            state = self._state_locked(key, after)
            if end > start:
                touched = range(start >> PAGE_SHIFT, ((end - 1) >> PAGE_SHIFT) + 1)
                for index in touched:
                    self._drop_page_locked(key, index)
            if after.st_size > old_size and old_size % PAGE_SIZE:
                self._drop_page_locked(key, old_size >> PAGE_SHIFT)  # its cached copy is short
            state.generation += 1
            # The kernel's cache (kernel first chance) took these bytes at ``offset`` as we wrote
            # them: still the file's bytes, unless an append landed elsewhere (a stale kernel size).
            landed_where_told = not append or start == offset
            if state.kernel_validators == validators_of(before) and landed_where_told:
                state.kernel_validators = validators_of(after)
            else:
                state.kernel_validators = None
            state.validators = validators_of(after)
            state.own_stamp = True  # our pwrite had returned: no write of ours is still copying
        return written

    def truncate(self, key: FileKey, length: int) -> None:
        """After the backing file was truncated to ``length``: drop all of the file's pages."""
        if length < 0:
            raise ValueError(f"truncate needs length >= 0, got {length}")
        self.invalidate(key)

    def invalidate(self, key: FileKey) -> None:
        """The file's bytes changed in ways a write does not describe (truncate, a punched hole): drop
        all of its pages; the next read adopts the file's new stat."""
        with self._lock:
            state = self._files.get(key)
            self._drop_file_locked(key)
            if state is not None:
                state.validators = None  # the next read adopts the new stat without a drop
                state.own_stamp = False
                state.kernel_validators = None

    def forget(self, key: FileKey) -> None:
        """The file's last link is gone (or renamed over): drop its pages and state."""
        with self._lock:
            self._drop_file_locked(key)
            self._forget_state_locked(key)

    def revalidate(self, key: FileKey, st: os.stat_result) -> None:
        """Drop the file's pages if size, mtime_ns or ctime_ns changed since they were cached."""
        with self._lock:
            self._revalidate_locked(key, st)

    def kernel_open(self, key: FileKey, st: os.stat_result, *, writable: bool) -> tuple[bool, bool]:
        """How an open may use the kernel's page cache (kernel first chance): ``(direct_io,
        keep_cache)`` for the open's reply.

        * keep (``(False, True)``): the file's size, mtime and ctime are those recorded at an
          earlier open or after our own completed write, so what the kernel cached is still the
          file's bytes (libfuse's auto_cache rule, written out).
        * drop (``(False, False)``): cached, but the kernel drops what it holds of the file first.
        * direct (``(True, False)``): the file changed behind the mount less than ``settle_ns``
          ago (the larger of ``RACY_NS`` and the kernel's attribute timeout). The kernel may still
          hold its size from before the change (it would cut reads there) and a writer may still
          be copying (the kernel would cache its old bytes), so this open's reads all reach the
          daemon, which serves the file as it is now. Opens for writing stay cached (a direct
          write would bypass the pages other descriptors cache) and drop.
        """
        current = validators_of(st)
        settled = time.time_ns() - st.st_ctime_ns >= self.settle_ns
        with self._lock:
            state = self._revalidate_locked(key, st)
            if settled or state.own_stamp:
                keep = state.kernel_validators == current
                state.kernel_validators = current
                return False, keep
            state.kernel_validators = None  # pages the kernel reads now may be a racing writer's old bytes
            return not writable, False

    def close(self) -> None:
        """Drop everything and destroy the tmem pool (DESTROY_POOL)."""
        with self._lock:
            self.cache.clear()
            for key in list(self._files):
                self._forget_state_locked(key)
            self.cleancache.invalidate_fs()

    # --- introspection -----------------------------------------------------------------------

    def stats(self) -> dict[str, int | str]:
        with self._lock:
            out: dict[str, int | str] = {
                "first_chance": self.first_chance,
                "backing_direct": int(self.backing_direct),
                "reads": self.reads,
                "writes": self.writes,
                "bytes_written": self.bytes_written,
                "page_cache_hits": self.cache.hits,
                "page_cache_misses": self.cache.misses,
                "page_cache_evictions": self.cache.evictions,
                "page_cache_pages": len(self.cache),
                "page_cache_capacity": int(self.cache.maxsize),
                "backing_reads": self.backing_reads,
                "backing_bytes_read": self.backing_bytes_read,
                "revalidate_drops": self.revalidate_drops,
                "stale_inserts_refused": self.stale_inserts_refused,
                "racy_pages_not_cached": self.racy_pages_not_cached,
                "readahead_loaded": self.readahead_loaded,
                "files": len(self._files),
            }
            for source, count in sorted(self._keys_by_source.items()):
                out[f"keys_{source}"] = count
            out.update(self.cleancache.stats())
            return out

    def check(self) -> None:
        with self._lock:
            self.cache.check()
            self.cleancache.check()
            for key in self.cache.cached_files():
                assert key in self._files, f"cached page of {key} without file state"
            for key in self.cleancache.tracked_keys():
                assert key in self._files, f"tmem page of {key} without validators to check it against"

    # --- internals (caller holds the lock) -----------------------------------------------------

    def _state_locked(self, key: FileKey, st: os.stat_result) -> _FileState:
        state = self._files.get(key)
        if state is None:
            if len(self._files) >= self._prune_at:
                self._prune_locked()
            state = self._files[key] = _FileState(validators_of(st))
            self._keys_by_source[key.source] += 1
        return state

    def _prune_locked(self) -> None:
        """Forget the states of files with no page cached here and none possibly in tmem: their
        validators guard nothing (a later read starts afresh). A reader that revalidated such a file
        before the prune finds its state gone and does not cache what it loaded (``_cache_loaded``)."""
        keep = set(self.cache.cached_files()) | set(self.cleancache.tracked_keys())
        for key in [key for key in self._files if key not in keep]:
            self._forget_state_locked(key)
        self._prune_at = max(PRUNE_FILES_MIN, 2 * len(self._files))

    def _forget_state_locked(self, key: FileKey) -> None:
        state = self._files.pop(key, None)
        if state is not None:
            state.generation += 1
            self._keys_by_source[key.source] -= 1
            if not self._keys_by_source[key.source]:
                del self._keys_by_source[key.source]

    def _revalidate_locked(self, key: FileKey, st: os.stat_result) -> _FileState:
        state = self._state_locked(key, st)
        current = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if state.validators != current:
            if state.validators is not None:
                self.revalidate_drops += 1
                self._drop_file_locked(key)
            state.validators = current
            state.own_stamp = False  # a change we did not make (or one we cannot tell from it)
        return state

    def _drop_page_locked(self, key: FileKey, index: int) -> None:
        self.cache.discard(key, index)
        self.cleancache.invalidate_page(key, index)

    def _drop_file_locked(self, key: FileKey) -> None:
        self.cache.discard_file(key)
        self.cleancache.invalidate_inode(key)
        state = self._files.get(key)
        if state is not None:
            state.generation += 1


def _assemble(pages: list[bytes | None], first: int, offset: int, end: int) -> bytes:
    """The bytes [offset, end) from consecutive pages starting at page ``first``.

    Stops at the first page shorter than the range needs (the file shrank under a read).
    """
    base = first << PAGE_SHIFT
    lo, hi = offset - base, end - base - ((len(pages) - 1) << PAGE_SHIFT)  # cuts in the first/last page
    if len(pages) == 1:
        page = pages[0] or b""
        return page[lo:hi]
    if None not in pages:  # the common case: one join, right when no page was short
        whole = b"".join([pages[0][lo:], *pages[1:-1], pages[-1][:hi]])  # type: ignore[index,list-item]
        if len(whole) == end - offset:
            return whole
    parts = []
    for slot, page in enumerate(pages):
        page = page or b""
        page_start = base + (slot << PAGE_SHIFT)
        lo = max(offset, page_start) - page_start
        hi = min(end, page_start + PAGE_SIZE) - page_start
        parts.append(page[lo:hi])
        if len(page) < hi:
            break
    return b"".join(parts)
