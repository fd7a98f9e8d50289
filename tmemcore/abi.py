"""The tmem ABI in one place: op codes, flag bits, return codes and byte-exact record layouts.

Layouts are those of x86-64 Xen's ``struct tmem_op`` (xen/include/public/tmem.h):
a header ``cmd`` (u32), ``pool_id`` (s32), then a union at byte 8 whose member depends on
``cmd``::

    v1 (Xen 4.0.2 / 4.1+): 56 bytes             v0 (Xen 4.0.0 / 4.0.1): 40 bytes
    gen   oid[3] u64 @8, index @32,             gen   object u64 @8, index @16,
          tmem_offset @36, pfn_offset @40,            tmem_offset @20, pfn_offset @24,
          len @44, cmfn u64 @48                       len @28, cmfn u64 @32
    creat uuid[2] u64 @8, flags @24, arg1 @28   creat (named "new") identical
    ctrl  subop @8, cli_id @12, arg1 @16,       ctrl  subop, cli_id, arg1, arg2,
          arg2 @20, oid[3] @24, buf @48               arg3 u64 @24, buf @32

The save/restore handle (``struct tmem_handle``) is pool_id u32, index u32, then the oid
(24 bytes in v1, 8 in v0).

Everything that builds or parses records (the host, the guest transports, the tests, the
stream code) goes through this module so the layouts exist exactly once.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .errors import BadAddress
from .oid import WORD_MASK, Oid

PAGE_SIZE = 4096
PAGE_SHIFT = 12

# --- spec versions -------------------------------------------------------------------
SPEC_V0 = 0
SPEC_V1 = 1
SPEC_VERSIONS = (SPEC_V0, SPEC_V1)

# --- hypercall commands (tmem.h) -------------------------------------------------------
TMEM_CONTROL = 0
TMEM_NEW_POOL = 1
TMEM_DESTROY_POOL = 2
TMEM_NEW_PAGE = 3
TMEM_PUT_PAGE = 4
TMEM_GET_PAGE = 5
TMEM_FLUSH_PAGE = 6
TMEM_FLUSH_OBJECT = 7
TMEM_READ = 8
TMEM_WRITE = 9
TMEM_XCHG = 10
TMEM_AUTH = 101
TMEM_RESTORE_NEW = 102

CMD_NAMES = {
    TMEM_CONTROL: "CONTROL",
    TMEM_NEW_POOL: "NEW_POOL",
    TMEM_DESTROY_POOL: "DESTROY_POOL",
    TMEM_NEW_PAGE: "NEW_PAGE",
    TMEM_PUT_PAGE: "PUT_PAGE",
    TMEM_GET_PAGE: "GET_PAGE",
    TMEM_FLUSH_PAGE: "FLUSH_PAGE",
    TMEM_FLUSH_OBJECT: "FLUSH_OBJECT",
    TMEM_READ: "READ",
    TMEM_WRITE: "WRITE",
    TMEM_XCHG: "XCHG",
    TMEM_AUTH: "AUTH",
    TMEM_RESTORE_NEW: "RESTORE_NEW",
}

CREAT_CMDS = frozenset({TMEM_NEW_POOL, TMEM_AUTH, TMEM_RESTORE_NEW})

# --- NEW_POOL flags word ----------------------------------------------------------------
TMEM_POOL_PERSIST = 0x1
TMEM_POOL_SHARED = 0x2
TMEM_POOL_PRECOMPRESSED = 0x4
TMEM_POOL_PAGESIZE_SHIFT = 4
TMEM_POOL_PAGESIZE_MASK = 0xF
TMEM_POOL_VERSION_SHIFT = 24
TMEM_POOL_VERSION_MASK = 0xFF
TMEM_POOL_RESERVED_BITS = 0x00FFFF00

# --- TMEM_CONTROL sub-ops (v1 numbering) --------------------------------------------------
TMEMC_THAW = 0
TMEMC_FREEZE = 1
TMEMC_FLUSH = 2
TMEMC_DESTROY = 3
TMEMC_LIST = 4
TMEMC_SET_WEIGHT = 5
TMEMC_SET_CAP = 6
TMEMC_SET_COMPRESS = 7
TMEMC_QUERY_FREEABLE_MB = 8
TMEMC_SAVE_BEGIN = 10
TMEMC_SAVE_GET_VERSION = 11
TMEMC_SAVE_GET_MAXPOOLS = 12
TMEMC_SAVE_GET_CLIENT_WEIGHT = 13
TMEMC_SAVE_GET_CLIENT_CAP = 14
TMEMC_SAVE_GET_CLIENT_FLAGS = 15
TMEMC_SAVE_GET_POOL_FLAGS = 16
TMEMC_SAVE_GET_POOL_NPAGES = 17
TMEMC_SAVE_GET_POOL_UUID = 18
TMEMC_SAVE_GET_NEXT_PAGE = 19
TMEMC_SAVE_GET_NEXT_INV = 20
TMEMC_SAVE_END = 21
TMEMC_RESTORE_BEGIN = 30
TMEMC_RESTORE_PUT_PAGE = 32
TMEMC_RESTORE_FLUSH_PAGE = 33
# tmemd extensions (not Xen; numbers Xen never used): a whole save stream uploaded to the host
# and restored there as ONE transaction under the host lock (control.RestoreUploads). Over a
# socket, the RESTORE_BEGIN .. RESTORE_FLUSH_PAGE sequence is many round trips that other guests
# can interleave with, and a failure would need destroy_client, which no hypercall offers.
TMEMC_RESTORE_STREAM_BEGIN = 64  # cli_id = target; -> upload token (>= 1), -EEXIST if the client exists
TMEMC_RESTORE_STREAM_DATA = 65  # cli_id, arg2 = token, oid = offset, arg1 = length, buf = bytes -> 1
TMEMC_RESTORE_STREAM_COMMIT = 66  # cli_id, arg2 = token, arg1 = flags, oid = total length, buf = message
TMEMC_RESTORE_STREAM_ABORT = 67  # cli_id, arg2 = token -> 1 dropped, 0 no such upload
RESTORE_STREAM_CONVERT = 0x1  # COMMIT flag: convert a stream of a version the host does not take

TMEM_CLIENT_COMPRESS = 0x1
TMEM_CLIENT_FROZEN = 0x2

CLI_ID_NULL = 0xFFFF  # "all clients" in control ops
MAX_POOLS_PER_DOMAIN = 16
MAX_GLOBAL_SHARED_POOLS = 16
MAX_SHARED_AUTH = 16

# --- save stream markers (xg_save_restore.h) ------------------------------------------
XC_SAVE_ID_TMEM = -5
XC_SAVE_ID_TMEM_EXTRA = -6

# --- return codes -------------------------------------------------------------------------
RC_HIT = 1  # put stored / get found / flush done
RC_MISS = 0  # get found nothing

# --- record layouts -------------------------------------------------------------------------
_HEADER = "<Ii"
GEN_V1 = struct.Struct(_HEADER + "QQQIIIIQ")
GEN_V0 = struct.Struct(_HEADER + "QIIIIQ")
CREAT_V1 = struct.Struct(_HEADER + "QQII24x")
CREAT_V0 = struct.Struct(_HEADER + "QQII8x")
CTRL_V1 = struct.Struct(_HEADER + "IIIIQQQQ")
CTRL_V0 = struct.Struct(_HEADER + "IIIIQQ")
CMD = struct.Struct("<I")

RECORD_SIZE = {SPEC_V1: GEN_V1.size, SPEC_V0: GEN_V0.size}  # 56 and 40
assert RECORD_SIZE == {SPEC_V1: 56, SPEC_V0: 40}
assert CREAT_V1.size == CTRL_V1.size == 56 and CREAT_V0.size == CTRL_V0.size == 40

HANDLE_V1 = struct.Struct("<IIQQQ")  # pool_id, index, oid[3]: 32 bytes
HANDLE_V0 = struct.Struct("<IIQ")  # pool_id, index, oid: 16 bytes
HANDLE_SIZE = {SPEC_V1: HANDLE_V1.size, SPEC_V0: HANDLE_V0.size}


def version_of_record(raw: bytes | bytearray | memoryview) -> int:
    """The layout version a record's length implies: 56 bytes is v1, 40 is v0."""
    n = len(raw)
    if n == 56:
        return SPEC_V1
    if n == 40:
        return SPEC_V0
    raise BadAddress(f"a tmem_op record is 56 (v1) or 40 (v0) bytes, got {n}")


def pool_flags(
    *,
    persistent: bool = False,
    shared: bool = False,
    version: int = SPEC_V1,
    pagesize: int = PAGE_SIZE,
) -> int:
    """The NEW_POOL flags word a guest sends (Linux drivers/xen/tmem.c does the same)."""
    shift = pagesize.bit_length() - 1 - PAGE_SHIFT
    flags = (TMEM_POOL_PERSIST if persistent else 0) | (TMEM_POOL_SHARED if shared else 0)
    flags |= (shift & TMEM_POOL_PAGESIZE_MASK) << TMEM_POOL_PAGESIZE_SHIFT
    return flags | (version & TMEM_POOL_VERSION_MASK) << TMEM_POOL_VERSION_SHIFT


def flags_version(flags: int) -> int:
    return (flags >> TMEM_POOL_VERSION_SHIFT) & TMEM_POOL_VERSION_MASK


def flags_pagesize(flags: int) -> int:
    return 1 << (((flags >> TMEM_POOL_PAGESIZE_SHIFT) & TMEM_POOL_PAGESIZE_MASK) + PAGE_SHIFT)


@dataclass
class TmemOp:
    """One decoded ``struct tmem_op``; which fields matter depends on ``cmd``.

    gen ops use oid/index/tmem_offset/pfn_offset/len/cmfn; creat ops (NEW_POOL, AUTH,
    RESTORE_NEW) use uuid/flags/arg1; CONTROL uses subop/cli_id/arg1/arg2/oid/buf.
    ``uuid`` is (uuid[0] "lo", uuid[1] "hi"). In v0, ``oid`` must fit in 64 bits
    (``object`` for gen ops, ``arg3`` for control).
    """

    cmd: int
    pool_id: int = 0
    oid: Oid = field(default_factory=Oid)
    index: int = 0
    tmem_offset: int = 0
    pfn_offset: int = 0
    len: int = 0
    cmfn: int = 0
    uuid: tuple[int, int] = (0, 0)
    flags: int = 0
    arg1: int = 0
    arg2: int = 0
    subop: int = 0
    cli_id: int = 0
    buf: int = 0

    def encode(self, version: int = SPEC_V1) -> bytes:
        """The raw record bytes in the given layout version."""
        try:
            if self.cmd in CREAT_CMDS:
                layout = CREAT_V1 if version == SPEC_V1 else CREAT_V0
                return layout.pack(self.cmd, self.pool_id, self.uuid[0], self.uuid[1], self.flags, self.arg1)
            if version == SPEC_V1:
                w0, w1, w2 = Oid(self.oid).words
                if self.cmd == TMEM_CONTROL:
                    return CTRL_V1.pack(
                        self.cmd, self.pool_id, self.subop, self.cli_id, self.arg1, self.arg2, w0, w1, w2, self.buf
                    )
                return GEN_V1.pack(
                    self.cmd, self.pool_id, w0, w1, w2, self.index, self.tmem_offset, self.pfn_offset, self.len, self.cmfn
                )
            if not Oid(self.oid).fits_v0:
                raise BadAddress(f"{self.oid!r} does not fit a v0 record's 64-bit object id")
            if self.cmd == TMEM_CONTROL:
                return CTRL_V0.pack(
                    self.cmd, self.pool_id, self.subop, self.cli_id, self.arg1, self.arg2, int(self.oid), self.buf
                )
            return GEN_V0.pack(
                self.cmd, self.pool_id, int(self.oid), self.index, self.tmem_offset, self.pfn_offset, self.len, self.cmfn
            )
        except struct.error as exc:
            raise BadAddress(f"field out of range for a tmem_op record: {exc}") from None

    @classmethod
    def decode(cls, raw: bytes | bytearray | memoryview, version: int | None = None) -> "TmemOp":
        """Parse a raw record. ``version`` defaults to what the length implies.

        Raises ``BadAddress`` (EFAULT, "copy from guest failed") when the length does not
        match the layout.
        """
        implied = version_of_record(raw)
        if version is not None and version != implied:
            raise BadAddress(f"expected a {RECORD_SIZE[version]}-byte v{version} record, got {len(raw)} bytes")
        (cmd,) = CMD.unpack_from(raw)
        if cmd in CREAT_CMDS:
            layout = CREAT_V1 if implied == SPEC_V1 else CREAT_V0
            cmd, pool_id, lo, hi, flags, arg1 = layout.unpack(raw)
            return cls(cmd, pool_id, uuid=(lo, hi), flags=flags, arg1=arg1)
        if implied == SPEC_V1:
            if cmd == TMEM_CONTROL:
                cmd, pool_id, subop, cli_id, arg1, arg2, w0, w1, w2, buf = CTRL_V1.unpack(raw)
                return cls(cmd, pool_id, Oid(w0 | w1 << 64 | w2 << 128), subop=subop, cli_id=cli_id,
                           arg1=arg1, arg2=arg2, buf=buf)
            cmd, pool_id, w0, w1, w2, index, toff, poff, length, cmfn = GEN_V1.unpack(raw)
            return cls(cmd, pool_id, Oid(w0 | w1 << 64 | w2 << 128), index, toff, poff, length, cmfn)
        if cmd == TMEM_CONTROL:
            cmd, pool_id, subop, cli_id, arg1, arg2, arg3, buf = CTRL_V0.unpack(raw)
            return cls(cmd, pool_id, Oid(arg3), subop=subop, cli_id=cli_id, arg1=arg1, arg2=arg2, buf=buf)
        cmd, pool_id, obj, index, toff, poff, length, cmfn = GEN_V0.unpack(raw)
        return cls(cmd, pool_id, Oid(obj), index, toff, poff, length, cmfn)


# --- fast builders for the guest hot path ---------------------------------------------------


def gen_record(cmd: int, pool_id: int, oid: int, index: int = 0, version: int = SPEC_V1) -> bytes:
    """A full-page gen record (PUT/GET/FLUSH_PAGE/FLUSH_OBJECT/DESTROY_POOL)."""
    if version == SPEC_V1:
        return GEN_V1.pack(cmd, pool_id, oid & WORD_MASK, (oid >> 64) & WORD_MASK, oid >> 128, index, 0, 0, 0, 0)
    if oid > WORD_MASK:
        raise BadAddress(f"oid {oid:#x} does not fit a v0 record's 64-bit object id")
    return GEN_V0.pack(cmd, pool_id, oid, index, 0, 0, 0, 0)


def new_pool_record(flags: int, uuid: tuple[int, int] = (0, 0), version: int = SPEC_V1) -> bytes:
    return TmemOp(TMEM_NEW_POOL, 0, uuid=uuid, flags=flags).encode(version)


def control_record(
    subop: int,
    cli_id: int = CLI_ID_NULL,
    arg1: int = 0,
    arg2: int = 0,
    oid: int = 0,
    pool_id: int = 0,
    version: int = SPEC_V1,
) -> bytes:
    return TmemOp(TMEM_CONTROL, pool_id, Oid(oid), subop=subop, cli_id=cli_id, arg1=arg1, arg2=arg2).encode(version)
