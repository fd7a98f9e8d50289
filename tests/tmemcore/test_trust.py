"""The admission rules (tmemcore.trust) on their own. Each rule also has a test through real sockets and
real peers (test_trust_unix.py, test_trust_tls.py, test_limits.py); these show the table's bookkeeping."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator

import pytest

from tmemcore import wire
from tmemcore.trust import Admission, Connection, Limits, Principal, normalize_subject, subject_text

ALICE = Principal("uid", "1000")
BOB = Principal("uid", "1001")
ROOT = Principal("uid", "0", control=True)


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    made: list[socket.socket] = []
    yield made
    for sock in made:
        sock.close()


def connection(sockets: list[socket.socket], principal: Principal, peer_key: str | None = None) -> Connection:
    sock, other = socket.socketpair()
    sockets += [sock, other]
    return Connection(sock, str(principal), peer_key or str(principal), principal)


def hello(admission: Admission, sockets: list[socket.socket], principal: Principal, requested: int,
          pooled: frozenset[int] = frozenset()) -> tuple[Connection, int, int]:
    conn = connection(sockets, principal)
    admission.admit(conn, exempt=principal.control)
    verdict = admission.welcome(conn, requested, lambda: pooled)
    admission.check()
    return conn, verdict.status, verdict.client_id


def test_client_zero_needs_control_rights(sockets):
    admission = Admission()
    assert hello(admission, sockets, ALICE, 0)[1] == -errno.EPERM
    assert hello(admission, sockets, ROOT, 0)[1:] == (0, 0)
    assert admission.client_ids() == {0: 1}


def test_an_id_is_its_holders_until_its_last_connection_leaves(sockets):
    admission = Admission()
    first, status, _ = hello(admission, sockets, ALICE, 7)
    assert status == 0
    assert hello(admission, sockets, BOB, 7)[1] == -errno.EPERM
    assert hello(admission, sockets, ROOT, 7)[1] == -errno.EPERM  # control rights do not take a guest's id
    second, status, _ = hello(admission, sockets, ALICE, 7)  # one principal may share its id
    assert status == 0 and admission.client_ids() == {7: 2}
    assert not admission.last_holder(first) and not admission.leave(first)
    assert admission.last_holder(second) and admission.leave(second)
    assert hello(admission, sockets, BOB, 7)[1:] == (0, 7)  # free again


def test_any_skips_held_ids_and_ids_the_host_holds_pools_for(sockets):
    admission = Admission()
    hello(admission, sockets, ALICE, 1)
    assert hello(admission, sockets, BOB, wire.CLIENT_ANY, pooled=frozenset({2, 3}))[2] == 4


def test_an_id_with_pools_but_no_connection_is_for_control_principals_only(sockets):
    admission = Admission()
    assert hello(admission, sockets, ALICE, 8, pooled=frozenset({8}))[1] == -errno.EPERM
    assert hello(admission, sockets, ROOT, 8, pooled=frozenset({8}))[1:] == (0, 8)


def test_limits_per_principal_guests_and_control(sockets):
    admission = Admission(Limits(guests=3, per_principal=2, control=1))
    assert [hello(admission, sockets, ALICE, wire.CLIENT_ANY)[1] for _ in range(3)] == [0, 0, -errno.EBUSY]
    assert hello(admission, sockets, BOB, wire.CLIENT_ANY)[1] == 0
    assert hello(admission, sockets, ROOT, wire.CLIENT_ANY)[1] == -errno.EBUSY  # 3 guests: full
    assert hello(admission, sockets, ROOT, 0)[1] == 0  # control has its own slot
    assert hello(admission, sockets, ROOT, 0)[1] == -errno.EBUSY


def test_pending_connections_give_way_oldest_of_the_same_peer_first(sockets):
    admission = Admission(Limits(pending=4, pending_per_peer=2))
    a1, a2, a3 = (connection(sockets, ALICE) for _ in range(3))
    assert admission.admit(a1) == [] and admission.admit(a2) == []
    assert admission.admit(a3) == [a1]  # alice's own oldest, not someone else's
    b = [connection(sockets, BOB, peer_key=f"bob{i}") for i in range(3)]
    assert admission.admit(b[0]) == [] and admission.admit(b[1]) == []
    assert admission.admit(b[2]) == [a2]  # four pending in all: the oldest goes
    assert admission.welcome(a1, 5, frozenset).status == -errno.ECONNABORTED  # a displaced one is not welcomed
    assert a1.sock.recv(1) == b""  # and its socket was shut down, so its thread wakes up
    admission.check()


def test_subjects_print_and_normalize_the_same_way():
    cert_subject = ((("organizationName", "tmem"),), (("commonName", "ops"),))
    assert subject_text(cert_subject) == "O=tmem,CN=ops"
    assert normalize_subject(" o = tmem , commonName=ops") == "O=tmem,CN=ops"
    for bad in ("ops", "CN=", "=x", "CN=a,,O=b"):
        with pytest.raises(ValueError, match="bad certificate subject"):
            normalize_subject(bad)


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="per_principal"):
        Limits(per_principal=0)
    with pytest.raises(ValueError, match="hello timeout"):
        Limits(hello_timeout=0)
