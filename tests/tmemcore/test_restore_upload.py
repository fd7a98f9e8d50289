"""TMEMC_RESTORE_STREAM_* (control.RestoreUploads): a stream uploaded in chunks, restored in one go."""

from __future__ import annotations

import errno
import io

import pytest

from tests.tmemcore.test_fuzz import snapshot
from tmemcore import abi
from tmemcore.control import upload_limit
from tmemcore.oid import Oid
from tmemcore.savestream import convert, decode_stream, encode_stream, save_client
from tmemcore.tmem import Tmem

PAGE = bytes(range(256)) * 16


def stream_of(pages: int = 3, version: int = abi.SPEC_V1) -> bytes:
    host = Tmem(memory_pages=32)
    pool = host.client(5).new_pool(persistent=True)
    for index in range(pages):
        assert pool.put(Oid(index + 1), index, PAGE[index:] + PAGE[:index])
    out = io.BytesIO()
    save_client(host, 5, out)
    data = out.getvalue()
    return data if version == abi.SPEC_V1 else encode_stream(convert(decode_stream(data), abi.SPEC_V0))


def ctl(host: Tmem, subop: int, cid: int, arg1: int = 0, arg2: int = 0, oid: int = 0,
        buf: bytearray | None = None) -> int:
    return host.do_tmem_op(0, abi.control_record(subop, cid, arg1=arg1, arg2=arg2, oid=oid), buf)


def upload(host: Tmem, cid: int, data: bytes, chunk: int = 5000) -> int:
    token = ctl(host, abi.TMEMC_RESTORE_STREAM_BEGIN, cid)
    assert token >= 1
    for offset in range(0, len(data), chunk):
        piece = bytearray(data[offset : offset + chunk])
        assert ctl(host, abi.TMEMC_RESTORE_STREAM_DATA, cid, len(piece), token, offset, piece) == 1
    return token


def commit(host: Tmem, cid: int, token: int, length: int, flags: int = 0) -> tuple[int, str]:
    message = bytearray(512)
    rc = ctl(host, abi.TMEMC_RESTORE_STREAM_COMMIT, cid, flags, token, length, message)
    return rc, bytes(message).split(b"\0", 1)[0].decode()


def populated() -> Tmem:
    host = Tmem(memory_pages=32)
    assert host.client(1).new_pool(persistent=True).put(Oid(1), 1, PAGE)
    return host


def test_an_uploaded_stream_restores_every_page():
    host = populated()
    data = stream_of()
    token = upload(host, 9, data)
    assert commit(host, 9, token, len(data)) == (1, "")
    pool = host.client(9).handle(0)
    assert [pool.get(Oid(i + 1), i) for i in range(3)] == [PAGE[i:] + PAGE[:i] for i in range(3)]
    assert host.control.uploads.staged_bytes() == 0
    host.check()


def test_refusals_change_nothing_and_say_why():
    host = populated()
    before = snapshot(host)
    v0 = stream_of(version=abi.SPEC_V0)
    token = upload(host, 9, v0)
    rc, message = commit(host, 9, token, len(v0))
    assert rc == -errno.EINVAL and "stream is v0 but this host accepts only v1" in message and "--convert" in message
    damaged = stream_of()[:-7]
    token = upload(host, 9, damaged)
    rc, message = commit(host, 9, token, len(damaged))
    assert rc == -errno.EINVAL and message.startswith("truncated stream at offset")
    token = upload(host, 9, stream_of())
    rc, message = commit(host, 9, token, len(stream_of()) + 1)  # a chunk went missing
    assert rc == -errno.EINVAL and "a chunk was lost" in message
    assert snapshot(host) == before and host.control.uploads.staged_bytes() == 0
    host.check()


def test_convert_flag_converts_a_v0_stream():
    host = populated()
    v0 = stream_of(version=abi.SPEC_V0)
    token = upload(host, 9, v0)
    assert commit(host, 9, token, len(v0), abi.RESTORE_STREAM_CONVERT) == (1, "")
    assert host.client(9).version == abi.SPEC_V1 and host.client(9).handle(0).get(Oid(2), 1) == PAGE[1:] + PAGE[:1]
    host.check()


def test_an_existing_client_is_refused_before_the_upload():
    host = populated()
    assert ctl(host, abi.TMEMC_RESTORE_STREAM_BEGIN, 1) == -errno.EEXIST
    assert ctl(host, abi.TMEMC_RESTORE_STREAM_BEGIN, abi.CLI_ID_NULL) == -errno.EINVAL
    data = stream_of()
    token = upload(host, 9, data)
    host.client(9).new_pool()  # the client appears while the upload is staged
    assert 9 in host.clients
    before = snapshot(host)
    rc, message = commit(host, 9, token, len(data))
    assert rc == -errno.EINVAL and "already exists" in message and snapshot(host) == before


def test_tokens_and_offsets_keep_stale_tools_out():
    host = populated()
    data = stream_of()
    first = upload(host, 9, data[:100])
    second = ctl(host, abi.TMEMC_RESTORE_STREAM_BEGIN, 9)  # a new upload for 9 replaces the first
    assert second != first and host.control.uploads.staged_bytes() == 0
    piece = bytearray(data[:100])
    assert ctl(host, abi.TMEMC_RESTORE_STREAM_DATA, 9, 100, first, 0, piece) == -1  # stale token
    assert ctl(host, abi.TMEMC_RESTORE_STREAM_DATA, 9, 100, second, 50, piece) == -errno.EINVAL  # a gap
    assert ctl(host, abi.TMEMC_RESTORE_STREAM_DATA, 9, 200, second, 0, piece) == -errno.EFAULT  # buf too short
    assert host.control.uploads.staged_bytes() == 0  # failed appends added nothing
    assert commit(host, 9, first, 0)[0] == -1
    assert ctl(host, abi.TMEMC_RESTORE_STREAM_ABORT, 9, arg2=first) == 0
    assert ctl(host, abi.TMEMC_RESTORE_STREAM_ABORT, 9, arg2=second) == 1
    assert commit(host, 9, second, 0)[0] == -1  # aborted: gone
    assert ctl(host, abi.TMEMC_RESTORE_STREAM_COMMIT, 9, 0x2, second) == -errno.EINVAL  # unknown flag
    assert 9 not in host.clients
    host.check()


def test_uploads_are_bounded_and_a_stale_one_makes_room():
    host = Tmem(memory_pages=1)
    limit = upload_limit(1)
    assert host.control.uploads.limit == limit
    stale = ctl(host, abi.TMEMC_RESTORE_STREAM_BEGIN, 8)
    big = bytearray(limit - 10)
    assert ctl(host, abi.TMEMC_RESTORE_STREAM_DATA, 8, len(big), stale, 0, big) == 1
    token = ctl(host, abi.TMEMC_RESTORE_STREAM_BEGIN, 9)
    piece = bytearray(100)
    assert ctl(host, abi.TMEMC_RESTORE_STREAM_DATA, 9, 100, token, 0, piece) == 1  # 8's stale upload dropped
    assert host.control.uploads.staged_bytes() == 100
    assert ctl(host, abi.TMEMC_RESTORE_STREAM_DATA, 8, 1, stale, len(big), bytearray(1)) == -1
    too_much = bytearray(limit)
    assert ctl(host, abi.TMEMC_RESTORE_STREAM_DATA, 9, limit, token, 100, too_much) == -errno.ENOMEM
    assert host.control.uploads.staged_bytes() == 100  # a refused chunk changes nothing
    host.check()


@pytest.mark.parametrize("version", abi.SPEC_VERSIONS)
def test_v0_control_records_work_too(version: int):
    host = Tmem(memory_pages=32, spec_version=version)
    data = stream_of(version=version)
    record = abi.control_record(abi.TMEMC_RESTORE_STREAM_BEGIN, 9, version=version)
    token = host.do_tmem_op(0, record)
    chunk = bytearray(data)
    record = abi.control_record(abi.TMEMC_RESTORE_STREAM_DATA, 9, arg1=len(data), arg2=token, version=version)
    assert host.do_tmem_op(0, record, chunk) == 1
    record = abi.control_record(abi.TMEMC_RESTORE_STREAM_COMMIT, 9, arg2=token, oid=len(data), version=version)
    assert host.do_tmem_op(0, record, None) == 1  # no message buffer: fine when it succeeds
    assert host.client(9).handle(0).get(Oid(3), 2) == PAGE[2:] + PAGE[:2]
    host.check()


def test_a_guest_cannot_upload():
    host = populated()
    assert host.do_tmem_op(1, abi.control_record(abi.TMEMC_RESTORE_STREAM_BEGIN, 9)) == -errno.EPERM
