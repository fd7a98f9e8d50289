"""Sealed save streams: the libxc stream, byte for byte, inside an authenticated envelope.

The libxc tmem stream has no checksum: most corrupted streams still parse, and a changed byte
of page data restores as a wrong page. A sealed stream carries an HMAC-SHA256 over the whole
stream and its header, so ``unseal`` refuses any change (and any truncation) before anything
is restored. The stream inside is unchanged, so ``unseal`` gives back exactly what libxc wrote
and reads (docs/stream-format.md, "Sealed streams").

Envelope (integers little-endian)::

    offset  size  field
    0       8     magic b"TMEMSEAL"
    8       2     format version (1)
    10      2     algorithm (1 = HMAC-SHA256)
    12      8     key id: HMAC-SHA256(key, b"tmemseal key id")[:8]
    20      8     N, the length of the stream
    28      N     the libxc stream (starts with the -5 marker)
    28+N    32    tag: HMAC-SHA256(key, bytes 0 .. 28+N-1), i.e. header and stream

Key file: one text line ``tmemseal-key-v1 <64 hex digits>`` (256 random bits), mode 0600;
``load_key`` refuses a file that group or others may access, as ssh does with private keys.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import StreamError

MAGIC = b"TMEMSEAL"
FORMAT_VERSION = 1
ALG_HMAC_SHA256 = 1
ALGORITHMS = {ALG_HMAC_SHA256: "HMAC-SHA256"}
HEADER = struct.Struct("<8sHH8sQ")  # magic, version, algorithm, key id, stream length
TAG_SIZE = 32
OVERHEAD = HEADER.size + TAG_SIZE  # 60 bytes around the stream
KEY_SIZE = 32
KEY_LABEL = "tmemseal-key-v1"
_KEY_ID_INFO = b"tmemseal key id"
_MAX_KEY_FILE = 4096  # a key file is one short line; do not slurp whatever a wrong path names


class SealError(StreamError):
    """A seal key or a sealed stream is unusable (one-line message; exit status 1 in tmemctl)."""


@dataclass(frozen=True)
class SealHeader:
    version: int
    algorithm: int
    key_id: bytes
    length: int

    @property
    def algorithm_name(self) -> str:
        return ALGORITHMS.get(self.algorithm, f"unknown algorithm {self.algorithm}")


# ===================================================================== envelope


def is_sealed(data: bytes) -> bool:
    """Whether ``data`` starts like a sealed stream (a libxc stream starts with fb ff ff ff)."""
    return data[: len(MAGIC)] == MAGIC


def key_id(key: bytes) -> bytes:
    """8 bytes that name a key without revealing it (so a wrong key is told from damage)."""
    return hmac.new(key, _KEY_ID_INFO, hashlib.sha256).digest()[:8]


def seal(stream: bytes, key: bytes) -> bytes:
    """``stream`` in an envelope whose tag only ``key`` can produce."""
    _check_key(key)
    header = HEADER.pack(MAGIC, FORMAT_VERSION, ALG_HMAC_SHA256, key_id(key), len(stream))
    mac = hmac.new(key, header, hashlib.sha256)
    mac.update(stream)
    return header + stream + mac.digest()


def read_header(sealed: bytes) -> SealHeader:
    """The envelope's header, checked for framing only (NOT authenticated: see ``unseal``)."""
    if len(sealed) < HEADER.size:
        raise SealError(f"truncated sealed stream: {len(sealed)} bytes, the header alone is {HEADER.size}")
    magic, version, algorithm, kid, length = HEADER.unpack_from(sealed)
    if magic != MAGIC:
        raise SealError("not a sealed stream (no TMEMSEAL header)")
    if version != FORMAT_VERSION:
        raise SealError(f"seal format version {version} is not supported (this tmemctl reads {FORMAT_VERSION})")
    if algorithm not in ALGORITHMS:
        raise SealError(f"seal algorithm {algorithm} is not supported (known: 1 = HMAC-SHA256)")
    expected = HEADER.size + length + TAG_SIZE
    if len(sealed) < expected:
        raise SealError(f"truncated sealed stream: {len(sealed)} bytes, its header announces {expected}")
    if len(sealed) > expected:
        raise SealError(f"{len(sealed) - expected} byte(s) of trailing data after the seal's tag")
    return SealHeader(version, algorithm, kid, length)


def unseal(sealed: bytes, key: bytes) -> bytes:
    """The stream inside ``sealed`` once its tag proves it unchanged since ``key`` sealed it."""
    _check_key(key)
    header = read_header(sealed)
    if not hmac.compare_digest(header.key_id, key_id(key)):
        raise SealError(f"sealed with another key (key id {header.key_id.hex()}, this key's is "
                        f"{key_id(key).hex()}), or the header is damaged: nothing was used")
    end = HEADER.size + header.length
    view = memoryview(sealed)
    mac = hmac.new(key, view[:end], hashlib.sha256)
    if not hmac.compare_digest(mac.digest(), view[end:]):
        raise SealError("the seal does not match: the stream was changed or damaged after it was sealed")
    return bytes(view[HEADER.size:end])


def body_unverified(sealed: bytes) -> bytes:
    """The stream inside ``sealed`` WITHOUT checking the tag (for ``inspect`` without a key only)."""
    header = read_header(sealed)
    return sealed[HEADER.size : HEADER.size + header.length]


def _check_key(key: bytes) -> None:
    if len(key) != KEY_SIZE:
        raise SealError(f"a seal key is {KEY_SIZE} bytes, got {len(key)}")


# ===================================================================== key files


def generate_key_file(path: Path) -> bytes:
    """A new random key written to ``path`` (created, mode 0600; an existing file is never
    replaced: it may be the only copy of the key older streams were sealed with)."""
    key = secrets.token_bytes(KEY_SIZE)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SealError(f"{path} exists: not overwriting a key (remove it first if you mean to)") from None
    try:
        with os.fdopen(fd, "w") as out:
            os.fchmod(out.fileno(), 0o600)  # whatever the umask was
            out.write(f"{KEY_LABEL} {key.hex()}\n")
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        os.unlink(path)
        raise
    return key


def load_key(path: Path) -> bytes:
    """The key in ``path``; SealError if it is not a key file or group/others may access it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY)
    except OSError as exc:
        raise SealError(f"{path}: cannot read the key: {exc.strerror}") from None
    try:
        info = os.fstat(fd)  # of the file opened, not of whatever the path names by now
        if not stat.S_ISREG(info.st_mode):
            raise SealError(f"{path}: a seal key must be a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise SealError(f"{path}: permissions {mode:04o} are too open: group and others must not access "
                            f"a seal key (chmod 600 {path})")
        text = os.read(fd, _MAX_KEY_FILE + 1)
    finally:
        os.close(fd)
    return _parse_key(path, text)


def _parse_key(path: Path, text: bytes) -> bytes:
    fields = text.decode("ascii", "replace").split()
    if len(text) > _MAX_KEY_FILE or len(fields) != 2 or fields[0] != KEY_LABEL:
        raise SealError(f"{path}: not a seal key file (expected one line '{KEY_LABEL} <64 hex digits>'; "
                        "tmemctl keygen makes one)")
    try:
        key = bytes.fromhex(fields[1])
    except ValueError:
        key = b""
    if len(key) != KEY_SIZE:
        raise SealError(f"{path}: the key must be {KEY_SIZE * 2} hex digits")
    return key
