"""Sealed streams (tmemcore.seal): the envelope refuses every changed or missing byte, key files."""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import stat
from pathlib import Path

import pytest

from tmemcore import abi, seal
from tmemcore.errors import StreamError
from tmemcore.oid import Oid
from tmemcore.savestream import decode_stream, restore_client, save_client
from tmemcore.tmem import Tmem

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def saved_stream() -> bytes:
    """A live save of two persistent pages (a wide oid), an ephemeral pool and one extra record."""
    host = Tmem(memory_pages=16)
    client = host.client(3)
    client.new_pool()
    persistent = client.new_pool(persistent=True)
    assert persistent.put(Oid.from_words(1, 2, 3), 4, bytes(range(256)) * 16)
    assert persistent.put(Oid(9), 0, b"page" * 1024)
    out = io.BytesIO()
    save_client(host, 3, out, live=True)
    return out.getvalue()


STREAM = saved_stream()
SEALED = seal.seal(STREAM, KEY)


def restored_pages(stream: bytes) -> dict[tuple[int, int], bytes] | None:
    """The persistent pages a restore of ``stream`` gives, or None when the restore is refused."""
    host = Tmem(memory_pages=16)
    try:
        restore_client(host, 3, io.BytesIO(stream))
    except StreamError:
        assert not host.clients, "a refused restore left a client behind"
        return None
    pool = host.client(3).handle(1) if host.client(3).pools[1] is not None else None
    if pool is None:
        return {}
    return {(int(n[2]), n[3]): pool.get(n[2], n[3]) for n in list(host.client(3).pools[1].live_nodes())}


def test_layout_is_the_documented_one():
    header = seal.HEADER.unpack_from(SEALED)
    assert header == (b"TMEMSEAL", 1, seal.ALG_HMAC_SHA256, seal.key_id(KEY), len(STREAM))
    assert SEALED[28 : 28 + len(STREAM)] == STREAM  # the libxc stream, byte for byte
    assert len(SEALED) == len(STREAM) + seal.OVERHEAD == len(STREAM) + 60
    assert SEALED[-32:] == hmac.new(KEY, SEALED[:-32], hashlib.sha256).digest()
    assert seal.key_id(KEY) == hmac.new(KEY, b"tmemseal key id", hashlib.sha256).digest()[:8]


def test_round_trip_gives_the_stream_back():
    assert seal.unseal(SEALED, KEY) == STREAM
    assert decode_stream(seal.unseal(SEALED, KEY)).version == abi.SPEC_V1
    assert seal.is_sealed(SEALED) and not seal.is_sealed(STREAM)


def test_unsealed_corruption_restores_wrong_bytes_that_the_seal_refuses():
    """Why sealing exists: a changed byte of page data restores cleanly, with a wrong page."""
    data_at = STREAM.index(b"page" * 8)
    damaged = bytearray(STREAM)
    damaged[data_at] ^= 0x01
    pages = restored_pages(bytes(damaged))
    assert pages is not None and pages[(9, 0)] != b"page" * 1024  # accepted, and wrong
    sealed = bytearray(SEALED)
    sealed[28 + data_at] ^= 0x01
    with pytest.raises(seal.SealError, match="does not match"):
        seal.unseal(bytes(sealed), KEY)


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_every_changed_byte_is_refused(mask: int):
    refused = 0
    for position in range(len(SEALED)):
        damaged = bytearray(SEALED)
        damaged[position] ^= mask
        with pytest.raises(seal.SealError):
            seal.unseal(bytes(damaged), KEY)
        refused += 1
    assert refused == len(SEALED)


def test_every_truncation_and_any_appended_byte_is_refused():
    for length in range(len(SEALED)):
        with pytest.raises(seal.SealError):
            seal.unseal(SEALED[:length], KEY)
    with pytest.raises(seal.SealError, match="trailing data"):
        seal.unseal(SEALED + b"\0", KEY)
    with pytest.raises(seal.SealError):  # a byte inserted in the stream shifts the tag
        seal.unseal(SEALED[:100] + b"\0" + SEALED[100:], KEY)


def test_a_consistently_edited_length_or_version_is_still_refused():
    """Edits that keep the framing valid (length and stream shortened together) fail on the tag."""
    shorter = STREAM[:-4]
    forged = seal.HEADER.pack(b"TMEMSEAL", 1, 1, seal.key_id(KEY), len(shorter)) + shorter + SEALED[-32:]
    with pytest.raises(seal.SealError, match="does not match"):
        seal.unseal(forged, KEY)
    for field, value, message in ((1, 2, "format version 2"), (2, 7, "algorithm 7")):
        fields = list(seal.HEADER.unpack_from(SEALED))
        fields[field] = value
        with pytest.raises(seal.SealError, match=message):
            seal.unseal(seal.HEADER.pack(*fields) + SEALED[seal.HEADER.size :], KEY)


def test_a_wrong_key_is_named_as_such():
    with pytest.raises(seal.SealError, match="another key"):
        seal.unseal(SEALED, OTHER_KEY)
    with pytest.raises(seal.SealError, match="32 bytes"):
        seal.seal(STREAM, b"short")


def test_body_unverified_only_checks_framing():
    damaged = bytearray(SEALED)
    damaged[-1] ^= 1
    assert seal.body_unverified(bytes(damaged)) == STREAM
    with pytest.raises(seal.SealError, match="truncated"):
        seal.body_unverified(SEALED[:-1])


# ------------------------------------------------------------------ key files


def test_keygen_writes_a_private_key_and_never_overwrites(tmp_path: Path):
    path = tmp_path / "seal.key"
    old_umask = os.umask(0)  # even with no umask, the key is 0600
    try:
        key = seal.generate_key_file(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(key) == 32 and seal.load_key(path) == key
    assert path.read_text() == f"tmemseal-key-v1 {key.hex()}\n"
    with pytest.raises(seal.SealError, match="exists: not overwriting"):
        seal.generate_key_file(path)
    assert seal.load_key(path) == key
    assert seal.generate_key_file(tmp_path / "second.key") != key


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_a_key_others_may_access_is_refused(tmp_path: Path, mode: int):
    path = tmp_path / "seal.key"
    seal.generate_key_file(path)
    path.chmod(mode)
    with pytest.raises(seal.SealError, match=f"permissions {mode:04o} are too open"):
        seal.load_key(path)


@pytest.mark.parametrize("text", [b"", b"tmemseal-key-v1\n", b"ssh-rsa AAAA\n", b"tmemseal-key-v1 abcd\n",
                                  b"tmemseal-key-v1 " + b"zz" * 32 + b"\n", b"x" * 5000])
def test_what_is_not_a_key_file_is_refused(tmp_path: Path, text: bytes):
    path = tmp_path / "seal.key"
    path.write_bytes(text)
    path.chmod(0o600)
    with pytest.raises(seal.SealError):
        seal.load_key(path)


def test_missing_key_and_a_directory_are_refused(tmp_path: Path):
    with pytest.raises(seal.SealError, match="cannot read the key"):
        seal.load_key(tmp_path / "none")
    (tmp_path / "dir").mkdir(mode=0o700)
    with pytest.raises(seal.SealError, match="regular file"):
        seal.load_key(tmp_path / "dir")
