"""Model-based test of Ops over the real cache stack (Hypothesis stateful, no FUSE).

The system under test is Ops + PageIO + CleanCache + the embedded tmem host with tiny caches; the model
is a dict of bytearrays. Writes and truncates go through Ops or behind its back (directly on the backing
file); every read through Ops must equal the model, and the stack's invariants must hold after each step.
Both first chances: ``daemon`` (guestfs's own first-chance cache, exclusive tmem) and ``kernel`` (no
first-chance cache here, tmem inclusive over a shared pool; Ops answers every read itself, so this checks
the daemon's side of kernel mode; tests/guestfs/test_kernel_cache_model.py adds the kernel's page cache).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from guestfs.filekey import key_for_fd, key_for_path
from guestfs.ops import Ops
from guestfs.stack import StackConfig, build_stack

# Same-size external rewrites are detected from mtime/ctime; with coarse (per-tick) timestamps, i.e.
# before multigrain timestamps (Linux 6.13), one can slip through within a tick -- the documented caveat,
# not what this test is about -- so on such kernels the external writer also moves mtime explicitly.
COARSE_TIMESTAMPS = tuple(int(part) for part in os.uname().release.split(".")[:2]) < (6, 13)

NAMES = st.sampled_from(["/a", "/b"])
OFFSETS = st.integers(min_value=0, max_value=6 * 4096)
PAYLOADS = st.binary(min_size=1, max_size=9000)


@dataclass
class FileInfo:
    flags: int
    fh: int = 0
    direct_io: int = 0
    keep_cache: int = 0


class OpsMachine(RuleBasedStateMachine):
    CONFIG = StackConfig(page_cache_pages=2, tmem_pages=8, abi="v1")

    def __init__(self) -> None:
        super().__init__()
        self.root = tempfile.mkdtemp(prefix="ops-model-")
        self.stack = build_stack(self.CONFIG)
        self.ops = Ops(self.root, self.stack.pageio, key_for_fd=key_for_fd, key_for_path=key_for_path)
        self.model: dict[str, bytearray] = {}
        self.open: dict[str, FileInfo] = {}
        for name in ("/a", "/b"):
            self._create(name)

    def _create(self, name: str) -> None:
        fi = FileInfo(flags=os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        self.ops.create(name, 0o644, fi)
        self.open[name] = fi
        self.model[name] = bytearray()

    @rule(name=NAMES, offset=OFFSETS, data=PAYLOADS)
    def write(self, name: str, offset: int, data: bytes) -> None:
        assert self.ops.write(name, data, offset, self.open[name]) == len(data)
        _apply_write(self.model[name], offset, data)

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

    @rule(name=NAMES, length=OFFSETS, through_ops=st.booleans())
    def truncate(self, name: str, length: int, through_ops: bool) -> None:
        if through_ops:
            self.ops.truncate(name, length, self.open[name])
        else:
            os.truncate(self.root + name, length)
        data = self.model[name]
        del data[length:]
        data.extend(bytes(length - len(data)))

    @rule(name=NAMES, offset=OFFSETS, size=st.integers(min_value=1, max_value=20000))
    def read(self, name: str, offset: int, size: int) -> None:
        got = self.ops.read(name, size, offset, self.open[name])
        assert got == bytes(self.model[name][offset:offset + size])

    @rule(name=NAMES)
    def reopen(self, name: str) -> None:
        self.ops.release(name, self.open[name])
        fi = FileInfo(flags=os.O_RDWR)
        self.ops.open(name, fi)
        self.open[name] = fi

    @rule(name=NAMES)
    def unlink_and_recreate(self, name: str) -> None:
        self.ops.release(name, self.open.pop(name))
        self.ops.unlink(name)
        self._create(name)

    @precondition(lambda self: len(self.model) == 2)
    @rule()
    def rename_a_over_b(self) -> None:
        self.ops.release("/b", self.open.pop("/b"))
        self.ops.rename("/a", "/b")
        self.model["/b"] = self.model.pop("/a")
        self.open["/b"] = self.open.pop("/a")
        self._create("/a")

    @invariant()
    def stack_invariants_hold(self) -> None:
        self.stack.check()
        self.ops.check()

    def teardown(self) -> None:
        for name, fi in self.open.items():
            self.ops.release(name, fi)
        self.stack.close()
        shutil.rmtree(self.root, ignore_errors=True)


class KernelFirstChanceOpsMachine(OpsMachine):
    """The same rules with ``--first-chance kernel``'s stack (tmem of 8 pages: hits, misses, evictions)."""

    CONFIG = StackConfig(tmem_pages=8, abi="v1", first_chance="kernel")

    @invariant()
    def tmem_is_inclusive(self) -> None:
        assert not self.stack.cleancache.exclusive_gets and self.stack.stats()["page_cache_pages"] == 0


TestOpsModel = OpsMachine.TestCase
TestOpsModel.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                 suppress_health_check=[HealthCheck.too_slow])
TestOpsModelKernelFirstChance = KernelFirstChanceOpsMachine.TestCase
TestOpsModelKernelFirstChance.settings = settings(max_examples=40, stateful_step_count=40, deadline=None,
                                                  suppress_health_check=[HealthCheck.too_slow])


def _apply_write(data: bytearray, offset: int, payload: bytes) -> None:
    if offset > len(data):
        data.extend(bytes(offset - len(data)))
    data[offset:offset + len(payload)] = payload
