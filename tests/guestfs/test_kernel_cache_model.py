"""Model-based test of --first-chance kernel's close-to-open contract, with a model of the kernel's page
cache in front of Ops (Hypothesis stateful, no FUSE).

The simulated kernel does what FUSE does with the open replies Ops gives (``fi.direct_io``,
``fi.keep_cache``): an open without keep_cache drops the inode's cached pages; a read through a cached
descriptor serves cached pages and asks Ops for the missing ones (whole pages, then caches them); a
direct_io descriptor asks Ops every time; writes through the mount go to Ops and patch the cached pages;
a truncate through the mount truncates them. Changes made behind the mount (directly on the backing
file) leave the simulated cache alone, as they leave the kernel's.

The contract checked: every read through a descriptor opened after the last change behind the mount
(i.e. after the writer closed) equals the model; reads through descriptors held across such a change are
done (their pages are cached) but not checked, as the contract allows them to be stale.

Simplifications: the kernel's file size is the backing file's (the documented stale-size window of
writable opens is not modelled), and the cached pages are 4096-byte zero-padded copies.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from guestfs.filekey import key_for_fd, key_for_path
from guestfs.ops import Ops
from guestfs.stack import StackConfig, build_stack

PAGE = 4096
COARSE_TIMESTAMPS = tuple(int(part) for part in os.uname().release.split(".")[:2]) < (6, 13)
NAMES = st.sampled_from(["/a", "/b"])
OFFSETS = st.integers(min_value=0, max_value=6 * PAGE)
PAYLOADS = st.binary(min_size=1, max_size=9000)
SIZES = st.integers(min_value=1, max_value=20000)


@dataclass
class FileInfo:
    flags: int
    fh: int = 0
    direct_io: int = 0
    keep_cache: int = 0


@dataclass
class KernelInode:
    """The kernel's page cache of one mount inode (a name's file; a recreated file is a new inode)."""

    pages: dict[int, bytearray] = field(default_factory=dict)
    stale: bool = False  # changed behind the mount since the last open: reads not checked until one

    def truncate(self, length: int) -> None:
        """truncate_pagecache: pages past the new end go, the new last page is zeroed past it."""
        last = (length + PAGE - 1) // PAGE
        for index in [index for index in self.pages if index >= last]:
            del self.pages[index]
        if length % PAGE and length // PAGE in self.pages:
            self.pages[length // PAGE][length % PAGE:] = bytes(PAGE - length % PAGE)


@dataclass
class Handle:
    fi: FileInfo
    inode: KernelInode


class KernelCacheMachine(RuleBasedStateMachine):
    CONFIG = StackConfig(tmem_pages=8, abi="v1", first_chance="kernel", attr_timeout=0.0)

    def __init__(self) -> None:
        super().__init__()
        self.root = tempfile.mkdtemp(prefix="kernel-cache-model-")
        self.stack = build_stack(self.CONFIG)
        self.ops = Ops(self.root, self.stack.pageio, key_for_fd=key_for_fd, key_for_path=key_for_path)
        self.model: dict[str, bytearray] = {}
        self.inodes: dict[str, KernelInode] = {}
        self.handles: dict[str, Handle] = {}  # one read-write descriptor per name
        self.opens = {"keep": 0, "drop": 0, "direct": 0}
        for name in ("/a", "/b"):
            self._create(name)

    # -- the simulated kernel -------------------------------------------------------------------------

    def _open(self, name: str, flags: int) -> Handle:
        fi = FileInfo(flags=flags)
        self.ops.open(name, fi)
        return self._opened(name, fi)

    def _opened(self, name: str, fi: FileInfo) -> Handle:
        inode = self.inodes[name]
        if not fi.keep_cache:
            inode.pages.clear()
        inode.stale = False  # from this open on, reads must be right
        self.opens["direct" if fi.direct_io else "keep" if fi.keep_cache else "drop"] += 1
        assert not (fi.direct_io and fi.flags & os.O_ACCMODE != os.O_RDONLY), "a writable open went direct_io"
        return Handle(fi, inode)

    def _create(self, name: str) -> None:
        fi = FileInfo(flags=os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        self.inodes[name] = KernelInode()
        self.ops.create(name, 0o644, fi)
        self.handles[name] = self._opened(name, fi)
        self.model[name] = bytearray()

    def _kernel_read(self, name: str, handle: Handle, offset: int, size: int) -> bytes:
        if handle.fi.direct_io:
            return self.ops.read(name, size, offset, handle.fi)
        file_size = os.stat(self.root + name).st_size
        end = min(offset + size, file_size)
        if offset >= end:
            return b""
        for index in range(offset // PAGE, (end - 1) // PAGE + 1):
            if index not in handle.inode.pages:
                data = self.ops.read(name, PAGE, index * PAGE, handle.fi)
                handle.inode.pages[index] = bytearray(data.ljust(PAGE, b"\0"))
        first = offset // PAGE
        joined = b"".join(bytes(handle.inode.pages[index]) for index in range(first, (end - 1) // PAGE + 1))
        return joined[offset - first * PAGE:end - first * PAGE]

    def _check_read(self, name: str, handle: Handle, offset: int, size: int) -> None:
        got = self._kernel_read(name, handle, offset, size)
        if not handle.inode.stale:
            assert got == bytes(self.model[name][offset:offset + size]), (name, offset, size, handle.fi)

    # -- through the mount -----------------------------------------------------------------------------

    @rule(name=NAMES, offset=OFFSETS, data=PAYLOADS)
    def write(self, name: str, offset: int, data: bytes) -> None:
        handle = self.handles[name]
        assert self.ops.write(name, data, offset, handle.fi) == len(data)
        _apply_write(self.model[name], offset, data)
        for index, page in handle.inode.pages.items():  # the kernel copies the bytes into its pages
            lo, hi = max(offset, index * PAGE), min(offset + len(data), (index + 1) * PAGE)
            if lo < hi:
                page[lo - index * PAGE:hi - index * PAGE] = data[lo - offset:hi - offset]

    @rule(name=NAMES, length=OFFSETS)
    def truncate(self, name: str, length: int) -> None:
        self.ops.truncate(name, length, self.handles[name].fi)
        self.inodes[name].truncate(length)
        _apply_truncate(self.model[name], length)

    @rule(name=NAMES, offset=OFFSETS, size=SIZES)
    def read(self, name: str, offset: int, size: int) -> None:
        self._check_read(name, self.handles[name], offset, size)

    @rule(name=NAMES, offset=OFFSETS, size=SIZES, writable=st.booleans())
    def read_through_a_new_open(self, name: str, offset: int, size: int, writable: bool) -> None:
        handle = self._open(name, os.O_RDWR if writable else os.O_RDONLY)
        try:
            self._check_read(name, handle, offset, size)
        finally:
            self.ops.release(name, handle.fi)

    @rule(name=NAMES)
    def reopen(self, name: str) -> None:
        self.ops.release(name, self.handles[name].fi)
        self.handles[name] = self._open(name, os.O_RDWR)

    @rule(name=NAMES)
    def drop_kernel_pages(self, name: str) -> None:
        """The kernel reclaimed the file's clean pages (memory pressure, POSIX_FADV_DONTNEED)."""
        self.inodes[name].pages.clear()

    @rule(name=NAMES)
    def unlink_and_recreate(self, name: str) -> None:
        self.ops.release(name, self.handles.pop(name).fi)
        self.ops.unlink(name)
        self._create(name)

    @precondition(lambda self: len(self.model) == 2)
    @rule()
    def rename_a_over_b(self) -> None:
        self.ops.release("/b", self.handles.pop("/b").fi)
        self.ops.rename("/a", "/b")
        self.model["/b"] = self.model.pop("/a")
        self.inodes["/b"] = self.inodes.pop("/a")
        self.handles["/b"] = self.handles.pop("/a")
        self._create("/a")

    # -- behind the mount --------------------------------------------------------------------------------

    @rule(name=NAMES, offset=OFFSETS, data=PAYLOADS)
    def external_write(self, name: str, offset: int, data: bytes) -> None:
        fd = os.open(self.root + name, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
            if COARSE_TIMESTAMPS:
                os.utime(fd, ns=(0, os.fstat(fd).st_mtime_ns + 1))
        finally:
            os.close(fd)
        _apply_write(self.model[name], offset, data)
        self.inodes[name].stale = True

    @rule(name=NAMES, length=OFFSETS)
    def external_truncate(self, name: str, length: int) -> None:
        os.truncate(self.root + name, length)
        _apply_truncate(self.model[name], length)
        self.inodes[name].stale = True

    @invariant()
    def stack_invariants_hold(self) -> None:
        self.stack.check()
        self.ops.check()

    def teardown(self) -> None:
        for name, handle in self.handles.items():
            self.ops.release(name, handle.fi)
        self.stack.close()
        shutil.rmtree(self.root, ignore_errors=True)


class JustChangedKernelCacheMachine(KernelCacheMachine):
    """attr_timeout 1 s: every change behind the mount is "just now", so read-only opens after one are
    direct_io and writable ones drop, and only our own writes keep the kernel's pages across an open."""

    CONFIG = StackConfig(tmem_pages=8, abi="v1", first_chance="kernel", attr_timeout=1.0)


TestKernelCacheModel = KernelCacheMachine.TestCase
TestKernelCacheModel.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
TestJustChangedKernelCacheModel = JustChangedKernelCacheMachine.TestCase
TestJustChangedKernelCacheModel.settings = settings(max_examples=40, stateful_step_count=40, deadline=None,
                                                    suppress_health_check=[HealthCheck.too_slow])


def _apply_write(data: bytearray, offset: int, payload: bytes) -> None:
    if offset > len(data):
        data.extend(bytes(offset - len(data)))
    data[offset:offset + len(payload)] = payload


def _apply_truncate(data: bytearray, length: int) -> None:
    del data[length:]
    data.extend(bytes(length - len(data)))


def test_the_simulated_kernel_keeps_drops_and_goes_direct() -> None:
    """A fixed run: the simulation is not vacuous (pages are kept across an open, dropped after a change
    behind the mount, and a just-changed read-only open goes direct)."""
    for machine_class, expected in ((KernelCacheMachine, {"keep", "drop"}),
                                    (JustChangedKernelCacheMachine, {"keep", "drop", "direct"})):
        machine = machine_class()
        try:
            machine.write("/a", 0, b"x" * 3 * PAGE)
            machine.reopen("/a")
            machine.read("/a", 0, 3 * PAGE)
            assert machine.inodes["/a"].pages  # cached by the read
            machine.reopen("/a")  # our own write, then unchanged: the kernel keeps them
            assert machine.handles["/a"].fi.keep_cache and machine.inodes["/a"].pages
            machine.external_write("/a", 5, b"new")
            machine.read("/a", 0, PAGE)  # held across the change: may be stale, not checked
            machine.read_through_a_new_open("/a", 0, PAGE, writable=False)  # after it: the new bytes
            assert not machine.inodes["/a"].stale
            machine.read("/a", 0, 3 * PAGE)
            machine.stack_invariants_hold()
            assert {kind for kind, count in machine.opens.items() if count} == expected, machine.opens
        finally:
            machine.teardown()
