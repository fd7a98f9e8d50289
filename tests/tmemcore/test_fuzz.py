"""Hypothesis-fuzzed raw records to do_tmem_op: only documented return codes, never an
exception, and a failing op leaves the stored state as it was (except the documented
side effects: -EFROZEN flushes still flush, -ENOSPC flushes the duplicate's old copy)."""

from __future__ import annotations

import errno
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tmemcore import Tmem, abi
from tmemcore.errors import EEMPTY, EFROZEN

DOCUMENTED = {-errno.EPERM, -errno.ENOMEM, -errno.EFAULT, -errno.ENODEV, -errno.EINVAL, -errno.ENOSPC,
              -errno.ENOSYS, -EFROZEN, -EEMPTY}
SIDE_EFFECT_CODES = {-EFROZEN, -errno.ENOSPC}
U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
SMALL = st.one_of(st.integers(0, 20), U32)
CMDS = st.one_of(st.integers(0, 11), st.sampled_from([101, 102]), U32)


def snapshot(t: Tmem) -> dict[object, object]:
    state: dict[object, object] = {}
    for cid, client in t.clients.items():
        state[("client", cid)] = (client.frozen, client.version, client.weight, client.cap, client.compress,
                                  client.live_migrating, tuple(client.auth_uuids), client.max_pages)
        for slot, pool in enumerate(client.pools):
            if pool is None:
                continue
            state[("pool", cid, slot)] = (id(pool), pool.persistent, pool.shared, pool.uuid)
            for oid, obj in pool.objects.items():
                for index, node in obj.items():
                    state[("page", cid, slot, oid, index)] = t.codec.decode(node[0])
    state["shared"] = tuple(id(p) for p in t.shared_pools)
    state["auth"] = t.global_shared_auth
    return state


def populated(accept_v0: bool) -> Tmem:
    t = Tmem(memory_pages=6, accept_v0=accept_v0)
    a = t.client(1)
    eph, pers = a.new_pool(), a.new_pool(persistent=True)
    a.new_pool(shared=True, uuid=(1, 2))
    for i in range(3):
        eph.put(1, i, bytes([i]) * 4096)
        pers.put(2, i, bytes([i + 9]) * 4096)
    if accept_v0:
        t.client(2).new_pool(version=0).put(5, 5, bytes(4096))
    return t


def records() -> st.SearchStrategy[bytes]:
    gen_v1 = st.builds(lambda c, p, w0, w1, w2, i, a, b, n, m: struct.pack("<IiQQQIIIIQ", c, p, w0, w1, w2, i, a, b, n, m),
                       CMDS, st.integers(-2, 17), st.sampled_from([0, 1, 2, 5, 2**64 - 1]), st.sampled_from([0, 2**64 - 1]),
                       st.sampled_from([0, 2**64 - 1]), SMALL, SMALL, SMALL, st.one_of(st.integers(0, 4097), U32), U64)
    gen_v0 = st.builds(lambda c, p, o, i, a, b, n, m: struct.pack("<IiQIIIIQ", c, p, o, i, a, b, n, m),
                       CMDS, st.integers(-2, 17), st.sampled_from([0, 1, 5, 2**64 - 1]), SMALL, SMALL, SMALL,
                       st.one_of(st.integers(0, 4097), U32), U64)
    ctrl_v1 = st.builds(lambda p, s, c, a1, a2, w: abi.CTRL_V1.pack(0, p, s, c, a1, a2, w, 0, 0, 0),
                        st.integers(-2, 17), st.one_of(st.integers(0, 40), U32),
                        st.sampled_from([0, 1, 2, 3, 0xFFFF, 70000]), st.one_of(st.integers(0, 5000), U32), SMALL, SMALL)
    creat = st.builds(lambda c, p, lo, hi, f, a: abi.CREAT_V1.pack(c, p, lo, hi, f, a),
                      st.sampled_from([1, 101, 102]), st.integers(-2, 17), st.sampled_from([0, 1, 2**64 - 1]),
                      st.sampled_from([0, 2, 2**64 - 1]), st.one_of(st.sampled_from([0, 1, 2, 3, 1 << 24, (1 << 24) | 3]), U32),
                      st.sampled_from([0, 1, 2, 9, 0xFFFF]))
    raw = st.binary(max_size=64)
    return st.one_of(gen_v1, gen_v0, ctrl_v1, creat, raw, raw.map(bytearray), gen_v1.map(lambda b: memoryview(b).cast("Q")))


PAGES = st.one_of(st.none(), st.just(bytes(4096)), st.binary(min_size=0, max_size=64).map(bytearray),
                  st.integers(0, 255).map(lambda b: bytearray([b]) * 4096), st.just(bytearray(5000)),
                  st.builds(lambda: memoryview(bytearray(4096)).cast("I")), st.builds(lambda: memoryview(bytes(4096))),
                  st.builds(lambda: [0] * 4096))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from([0, 1, 2, 3, 70000, -1]), records(), PAGES), min_size=1, max_size=6),
       st.booleans())
def test_raw_records_return_documented_codes_and_fail_cleanly(ops: list[tuple[int, bytes, object]], accept_v0: bool) -> None:
    t = populated(accept_v0)
    for cid, op, page in ops:
        before = snapshot(t)
        rc = t.do_tmem_op(cid, op, page)  # type: ignore[arg-type]
        assert isinstance(rc, int)
        assert rc >= 0 or rc in DOCUMENTED, f"undocumented return code {rc}"
        if rc < 0 and rc not in SIDE_EFFECT_CODES:
            after = snapshot(t)
            assert after == before, f"failed op (rc={rc}) changed state"
        t.check()
