"""The host's strict shared-pool authorization (``Tmem(shared_auth=True, shared_auth_strict=True)``, what
``tmemd --shared-auth`` builds): an unauthorized shared NEW_POOL is -EPERM, and TMEM_AUTH may name a client
that has no pool yet."""

from __future__ import annotations

import errno

from tmemcore import abi
from tmemcore.client import uuid_text
from tmemcore.tmem import Tmem

UUID = (0x1111, 0x2222)


def shared_new_pool(uuid: tuple[int, int] = UUID, persistent: bool = False) -> bytes:
    return abi.new_pool_record(abi.pool_flags(persistent=persistent, shared=True), uuid=uuid)


def auth(client: int, uuid: tuple[int, int] = UUID, on: bool = True) -> bytes:
    return abi.TmemOp(abi.TMEM_AUTH, 0, uuid=uuid, flags=int(on), arg1=client).encode()


def strict_host() -> Tmem:
    return Tmem(memory_pages=16, shared_auth=True, shared_auth_strict=True)


def test_unauthorized_shared_new_pool_is_eperm_and_creates_nothing() -> None:
    host = strict_host()
    assert host.do_tmem_op(3, shared_new_pool()) == -errno.EPERM
    assert 3 not in host.clients and host.stats()["shared"] == []  # no client, no pool: state unchanged
    assert host.do_tmem_op(3, abi.new_pool_record(abi.pool_flags())) == 0  # a private pool needs no grant
    assert host.do_tmem_op(3, shared_new_pool()) == -errno.EPERM
    assert [slot for slot, pool in enumerate(host.clients[3].pools) if pool] == [0]
    host.check()


def test_a_grant_made_before_the_client_exists_waits_for_it() -> None:
    host = strict_host()
    assert host.do_tmem_op(0, auth(5)) == 1  # a Xen-rule host answers -EINVAL: no client 5
    assert 5 not in host.clients and host.pending_auth[5][0] == UUID
    host.check()
    assert host.do_tmem_op(6, shared_new_pool()) == -errno.EPERM  # the grant is 5's only
    assert host.do_tmem_op(5, shared_new_pool()) == 0
    assert host.clients[5].pools[0].shared and host.pending_auth == {}
    assert UUID in host.clients[5].auth_uuids
    host.check()


def test_revoking_a_pending_grant_and_the_sixteen_slot_limit() -> None:
    host = strict_host()
    assert host.do_tmem_op(0, auth(9, on=False)) == 0  # nothing to revoke
    for word in range(abi.MAX_SHARED_AUTH):
        assert host.do_tmem_op(0, auth(9, (word, 1))) == 1
    assert host.do_tmem_op(0, auth(9, (99, 1))) == -errno.ENOMEM
    for word in range(abi.MAX_SHARED_AUTH):
        assert host.do_tmem_op(0, auth(9, (word, 1), on=False)) == 1
    assert host.pending_auth == {}
    host.check()


def test_restore_new_keeps_xens_silent_rule() -> None:
    """RESTORE_NEW comes from the control domain: an unauthorized shared pool is restored private, as Xen."""
    host = strict_host()
    assert host.do_tmem_op(0, abi.control_record(abi.TMEMC_RESTORE_BEGIN, 4)) == 1
    record = abi.TmemOp(abi.TMEM_RESTORE_NEW, 2, uuid=UUID, flags=abi.pool_flags(shared=True), arg1=4).encode()
    assert host.do_tmem_op(0, record) == 2
    assert not host.clients[4].pools[2].shared
    host.check()


def test_the_global_switch_and_the_empty_uuid_still_work_as_xen() -> None:
    host = strict_host()
    all_ones = ((1 << 64) - 1, (1 << 64) - 1)
    assert host.do_tmem_op(1, shared_new_pool(all_ones)) == 0  # (-1,-1): silently private, as Xen
    assert not host.clients[1].pools[0].shared
    assert host.do_tmem_op(0, auth(abi.CLI_ID_NULL)) == 1
    assert host.do_tmem_op(2, shared_new_pool()) == 0 and host.clients[2].pools[0].shared
    host.check()


def test_uuid_text_is_libxc_order() -> None:
    assert uuid_text((0x0123456789ABCDEF, 0xFEDCBA9876543210)) == "fedcba98-7654-3210-0123-456789abcdef"
