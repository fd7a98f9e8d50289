"""File keys: Linux's 24-byte filekey words, hashing of long handles, fallbacks, identity."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st
from tmemcore.oid import Oid

from guestfs.filekey import FileKey, file_handle, key_for_fd, key_for_path, oid_from_handle, path_handle


def test_key_of_a_real_file_is_its_handle_words(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    k = key_for_path(str(path))
    found = file_handle(os.open(path, os.O_RDONLY))
    if found is None:
        pytest.skip(f"{tmp_path} has no file handles")
    handle_type, handle = found
    assert (k.handle_type, k.handle) == (handle_type, handle)
    assert k.source == "handle" and len(handle) <= 24
    assert k.oid == Oid.from_bytes24(handle.ljust(24, b"\0"))  # Linux: zero-padded LE u64 words
    st_ = path.stat()
    assert (k.dev, k.ino) == (st_.st_dev, st_.st_ino)


def test_same_file_same_key_other_file_other_key(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"1")
    b.write_bytes(b"2")
    ka, ka2, kb = key_for_path(str(a)), key_for_path(str(a)), key_for_path(str(b))
    assert ka == ka2 and hash(ka) == hash(ka2) and ka is not ka2
    assert ka != kb and ka.oid != kb.oid


def test_key_for_fd_matches_key_for_path(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert key_for_fd(fd) == key_for_path(str(path))
    finally:
        os.close(fd)


def test_key_for_path_needs_no_access_to_the_file(tmp_path: Path) -> None:
    """unlink, rename-over and truncate key a file by path: a mode-0000 file must not stop them (for a
    non-root daemon; root is not refused anyway): with handles, nothing is opened."""
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    fd = os.open(path, os.O_RDONLY)
    try:
        expected = key_for_fd(fd)
    finally:
        os.close(fd)
    if expected.source != "handle":
        pytest.skip("no handles here")
    path.chmod(0)
    assert path_handle(str(path)) == (expected.handle_type, expected.handle)
    assert key_for_path(str(path)) == expected


def test_recreated_file_gets_a_new_key(tmp_path: Path) -> None:
    """ext4 reuses the inode number after unlink; the handle's generation still differs."""
    path = tmp_path / "f"
    keys = []
    for _ in range(3):
        path.write_bytes(b"x")
        keys.append(key_for_path(str(path)))
        path.unlink()
    if keys[0].source != "handle":
        pytest.skip("no handles here")
    assert len({k.oid for k in keys}) == 3


def test_no_handles_falls_back_to_inode_and_ctime() -> None:
    k = key_for_path("/proc/self/status")  # proc: EOPNOTSUPP and no FS_IOC_GETVERSION
    st_ = os.stat("/proc/self/status")
    assert k.source == "ino-ctime" and k.handle_type == -1 and k.handle == b""
    assert k.oid == st_.st_ino | st_.st_ctime_ns << 64


@given(handle_type=st.integers(-(2**31), 2**31 - 1), handle=st.binary(max_size=24))
def test_short_handles_are_linux_filekeys(handle_type: int, handle: bytes) -> None:
    oid, source = oid_from_handle(handle_type, handle)
    assert source == "handle" and Oid(oid).to_bytes24() == handle.ljust(24, b"\0")


@given(handle=st.binary(min_size=25, max_size=128))
def test_long_handles_hash_type_and_bytes_to_192_bits(handle: bytes) -> None:
    oid, source = oid_from_handle(0xF8, handle)
    data = (0xF8).to_bytes(4, "little") + handle
    assert source == "handle-hashed"
    assert oid == xxhash.xxh3_128_intdigest(data) | xxhash.xxh64_intdigest(data) << 128
    assert oid != oid_from_handle(0xF9, handle)[0]  # the handle type is part of the identity


def test_identity_includes_handle_type_and_dev() -> None:
    a = FileKey(oid=1, source="handle", handle_type=1, handle=b"\1", dev=5, ino=1)
    assert a != FileKey(oid=1, source="handle", handle_type=0x81, handle=b"\1", dev=5, ino=1)
    assert a != FileKey(oid=1, source="handle", handle_type=1, handle=b"\1", dev=6, ino=1)
    assert len(a.identity_bytes()) == 44
    assert a.identity_bytes() != FileKey(oid=1, source="handle", handle_type=1, dev=6, ino=1).identity_bytes()


def test_synthetic_keys_for_the_lab() -> None:
    k = FileKey(oid=123, source="synthetic", ino=123)
    assert (k.handle_type, k.handle, k.dev) == (-1, b"", 0)
    assert {k: 1}[FileKey(oid=123, source="synthetic", ino=123)] == 1


def test_bad_keys_are_rejected() -> None:
    with pytest.raises(ValueError, match="192 bits"):
        FileKey(oid=1 << 192, source="synthetic")
    with pytest.raises(ValueError, match="source"):
        FileKey(oid=1, source="guess")


def test_bad_fd_is_an_error() -> None:
    with pytest.raises(OSError):
        key_for_fd(987654)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("options", "source"), [("", "ino-ctime"), (",index=on,nfs_export=on", "handle-hashed")])
def test_overlayfs_keys(tmp_path: Path, options: str, source: str) -> None:
    """overlayfs: no handles by default (fallback), 32-byte handles with nfs_export (hashed)."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting overlayfs needs root")
    dirs = {name: tmp_path / name for name in ("lower", "upper", "work", "merged")}
    for d in dirs.values():
        d.mkdir()
    (dirs["lower"] / "f").write_bytes(b"lower")
    opts = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}{options}"
    mounted = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(dirs["merged"])],
                             capture_output=True, text=True, timeout=30)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount overlayfs here: {mounted.stderr.strip()}")
    try:
        k = key_for_path(str(dirs["merged"] / "f"))
        assert k.source == source
        if source == "handle-hashed":
            assert len(k.handle) > 24
            assert k.oid == oid_from_handle(k.handle_type, k.handle)[0]
            assert k == key_for_path(str(dirs["merged"] / "f"))
        else:
            assert (k.handle_type, k.handle) == (-1, b"")
    finally:
        subprocess.run(["umount", str(dirs["merged"])], capture_output=True, timeout=30)


def test_no_handles_but_a_generation_gives_ino_gen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import guestfs.filekey as filekey

    path = tmp_path / "f"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDONLY)
    try:
        generation = filekey.inode_generation(fd)
        if generation is None:
            pytest.skip(f"{tmp_path} has no FS_IOC_GETVERSION")
        with_handle = key_for_fd(fd)
        monkeypatch.setattr(filekey, "file_handle", lambda fd: None)  # as on overlayfs / some FUSE fs
        k = key_for_fd(fd)
    finally:
        os.close(fd)
    assert k.source == "ino-gen" and k.oid == k.ino | generation << 64
    if with_handle.handle_type == 1:  # ext4 FILEID_INO32_GEN: the handle holds the same generation
        assert int.from_bytes(with_handle.handle[4:8], "little") == generation
