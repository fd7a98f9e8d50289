"""Spec versions: v1-only (default), v0-only (spec_version=0) and mixed (accept_v0) hosts."""

from __future__ import annotations

import errno

from tmemtest import gen, get, new_pool, put

from tmemcore import Tmem, abi


def test_default_host_is_v1_only() -> None:
    t = Tmem(memory_pages=8)
    assert new_pool(t, 1, version=0) == -errno.EPERM  # a v0 guest's 40-byte NEW_POOL (Xen 4.1)
    assert new_pool(t, 1, version=0, record_version=1) == -errno.EPERM
    assert new_pool(t, 1) == 0


def test_v0_only_host_refuses_v1_pools() -> None:
    t = Tmem(memory_pages=8, spec_version=0)
    assert new_pool(t, 1) == -errno.EPERM
    pool = new_pool(t, 1, version=0)
    assert pool == 0
    assert put(t, 1, pool, 77, 3, 5, version=0) == 1
    assert get(t, 1, pool, 77, 3, version=0)[0] == 1
    assert put(t, 1, pool, 77, 3, 5, version=1) == -errno.EFAULT  # 56-byte records are not v0
    t.check()


def test_accept_v0_reads_each_client_in_its_layout() -> None:
    t = Tmem(memory_pages=8, accept_v0=True)
    v0 = new_pool(t, 1, version=0)
    v1 = new_pool(t, 2)
    assert put(t, 1, v0, 0x1234, 1, 7, version=0) == 1
    assert put(t, 2, v1, (1 << 130) + 5, 1, 8) == 1
    assert put(t, 1, v0, 0x1234, 1, 7, version=1) == -errno.EFAULT  # wrong length for this client
    assert put(t, 2, v1, 5, 1, 8, version=0) == -errno.EFAULT
    rc, out = get(t, 1, v0, 0x1234, 1, version=0)
    assert rc == 1 and out[0] == 7
    # a v0 oid is the v1 oid (oid, 0, 0): the same page seen through the Python API
    t.client(1).handle(v0).put(0x99, 0, bytes(4096))
    assert get(t, 1, v0, 0x99, 0, version=0)[0] == 1
    t.check()


def test_client_pools_share_one_version() -> None:
    t = Tmem(memory_pages=8, accept_v0=True)
    assert new_pool(t, 1, version=0) == 0
    assert new_pool(t, 1, version=1) == -errno.EPERM  # other version, same client
    assert new_pool(t, 1, version=0) == 1
    assert t.do_tmem_op(1, gen(abi.TMEM_DESTROY_POOL, 0, version=0)) == 1
    assert t.do_tmem_op(1, gen(abi.TMEM_DESTROY_POOL, 1, version=0)) == 1
    assert new_pool(t, 1, version=1) == 0  # no pools left: the client may start over
    t.check()


def test_python_api_defaults_to_client_then_host_version() -> None:
    t = Tmem(memory_pages=8, accept_v0=True)
    c = t.client(1)
    p0 = c.new_pool(version=0)
    assert c.version == 0 and c.new_pool().persistent is False and c.version == 0
    assert p0.put((1 << 64) - 2, 0, bytes(4096))  # the largest storable v0 oid


def test_version_check_comes_first_in_validation_order() -> None:
    t = Tmem(memory_pages=8)
    flags = abi.pool_flags(version=0, pagesize=8192) | abi.TMEM_POOL_PRECOMPRESSED | 0x100
    assert t.do_tmem_op(1, abi.new_pool_record(flags)) == -errno.EPERM
    # v0 has no reserved-bits check
    t0 = Tmem(memory_pages=8, spec_version=0)
    assert t0.do_tmem_op(1, abi.new_pool_record(abi.pool_flags(version=0) | 0x100, version=0)) == 0
