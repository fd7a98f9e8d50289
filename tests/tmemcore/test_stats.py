"""TMEMC_LIST golden text (short and long) and its agreement with Tmem.stats()."""

from __future__ import annotations

import json
import re

from tmemcore import Tmem
from tmemcore.stats import CLIENT_LONG, CLIENT_SHORT, GLOBAL_LONG, GLOBAL_SHORT, POOL_LONG

SHORT = """\
G=Tt:0,Te:0,Cf:0,Af:0,Pf:0,Ta:6,Lm:0,Et:0,Ea:0,Rt:0,Ra:0,Rx:0,Fp:0
S=SI:0,PT:ES,U0:deadbeef,U1:cafe,SC:1,SC:2
C=CI:1,ww:3,ca:0,co:0,fr:0,Tc:0,Ge:2,Pp:2,Gp:1
P=CI:1,PI:0,PT:EP,U0:0,U1:0
P=CI:1,PI:1,PT:PP,U0:0,U1:0
P=CI:1,PI:2,PT:ES,U0:deadbeef,U1:cafe
C=CI:2,ww:0,ca:5,co:0,fr:1,Tc:0,Ge:0,Pp:0,Gp:0
P=CI:2,PI:0,PT:ES,U0:deadbeef,U1:cafe
"""

LONG = """\
G=Tt:0,Te:0,Cf:0,Af:0,Pf:0,Ta:6,Lm:0,Et:0,Ea:0,Rt:0,Ra:0,Rx:0,Fp:0,Ec:1,Em:2,Oc:2,Om:3,Nc:0,Nm:0,Pc:2,Pm:3,Fc:2,Fm:3,Sc:0,Sm:0,Ep:3,Gd:0,Zt:0,Gz:0
S=SI:0,PT:ES,U0:deadbeef,U1:cafe,SC:1,SC:2,Pc:0,Pm:1,Oc:0,Om:1,Nc:0,Nm:0,ps:1,pt:1,pd:0,pr:0,px:0,gs:1,gt:1,fs:0,ft:0,os:1,ot:2
C=CI:1,ww:3,ca:0,co:0,fr:0,Tc:0,Ge:2,Pp:2,Gp:1,Ec:1,Em:2,cp:0,cb:0,cn:0,cm:0
P=CI:1,PI:0,PT:EP,U0:0,U1:0,Pc:1,Pm:2,Oc:1,Om:1,Nc:0,Nm:0,ps:2,pt:2,pd:0,pr:0,px:0,gs:1,gt:2,fs:0,ft:0,os:0,ot:0
P=CI:1,PI:1,PT:PP,U0:0,U1:0,Pc:1,Pm:1,Oc:1,Om:1,Nc:0,Nm:0,ps:2,pt:2,pd:0,pr:1,px:0,gs:1,gt:1,fs:0,ft:1,os:0,ot:0
P=CI:1,PI:2,PT:ES,U0:deadbeef,U1:cafe,Pc:0,Pm:1,Oc:0,Om:1,Nc:0,Nm:0,ps:1,pt:1,pd:0,pr:0,px:0,gs:1,gt:1,fs:0,ft:0,os:1,ot:2
C=CI:2,ww:0,ca:5,co:0,fr:1,Tc:0,Ge:0,Pp:0,Gp:0,Ec:0,Em:0,cp:0,cb:0,cn:0,cm:0
P=CI:2,PI:0,PT:ES,U0:deadbeef,U1:cafe,Pc:0,Pm:1,Oc:0,Om:1,Nc:0,Nm:0,ps:1,pt:1,pd:0,pr:0,px:0,gs:1,gt:1,fs:0,ft:0,os:1,ot:2
"""


def golden_host() -> Tmem:
    t = Tmem(memory_pages=8)
    a, b = t.client(1), t.client(2)
    p, q = a.new_pool(), a.new_pool(persistent=True)
    s = a.new_pool(shared=True, uuid=(0xDEADBEEF, 0xCAFE))
    s2 = b.new_pool(shared=True, uuid=(0xDEADBEEF, 0xCAFE))
    zero = bytes(4096)
    p.put(1, 0, zero)
    p.put(1, 1, b"\1" * 4096)
    p.get(1, 0)
    p.get(1, 5)
    q.put(2, 0, zero)
    q.put(2, 0, zero)
    q.get(2, 0)
    q.flush_page(2, 3)
    s.put(3, 0, zero)
    s2.get(3, 0)
    s.flush_object(3)
    s.flush_object(4)
    t.set_weight(1, 3)
    t.set_cap(2, 5)
    t.freeze(2)
    t.check()
    return t


def test_list_golden_short_and_long() -> None:
    t = golden_host()
    assert t.list_text() == SHORT
    assert t.list_text(long=True) == LONG
    assert t.list_text(2, long=True) == "".join(LONG.splitlines(keepends=True)[-2:])


def test_keys_are_two_letters_and_unique_per_line() -> None:
    for group in ((GLOBAL_SHORT + GLOBAL_LONG), (CLIENT_SHORT + CLIENT_LONG), POOL_LONG):
        keys = [k for k, _ in group]
        assert len(keys) == len(set(keys)) and all(re.fullmatch(r"[A-Za-z]{2}", k) for k in keys)


def test_stats_dict_matches_list_text() -> None:
    t = golden_host()
    stats = json.loads(t.stats_json())
    fields = dict(item.split(":") for item in LONG.splitlines()[0][2:].split(","))
    for key, name in GLOBAL_SHORT + GLOBAL_LONG:
        assert int(fields[key]) == stats["global"][name], key
    client = stats["clients"][0]
    cfields = dict(item.split(":") for item in LONG.splitlines()[2][2:].split(","))
    for key, name in CLIENT_SHORT + CLIENT_LONG:
        assert int(cfields[key]) == client[name], key
    assert client["pools"][1]["dup_puts_replaced"] == 1 and client["pools"][1]["type"] == "PP"
