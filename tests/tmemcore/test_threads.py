"""Thread safety: many threads on one host through both paths; invariants hold after."""

from __future__ import annotations

import threading

from tmemcore import Tmem, abi


def test_concurrent_python_and_abi_clients_keep_invariants() -> None:
    t = Tmem(memory_pages=32)
    errors: list[BaseException] = []

    def python_client(cid: int) -> None:
        try:
            pool = t.client(cid).new_pool()
            for i in range(400):
                data = bytes([cid]) * 4096
                pool.put(cid, i % 50, data)
                got = pool.get(cid, (i * 7) % 50)
                assert got is None or got == data
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    def abi_client(cid: int) -> None:
        try:
            pool = t.do_tmem_op(cid, abi.new_pool_record(abi.pool_flags()))
            frame = bytearray([cid]) * 4096
            out = bytearray(4096)
            for i in range(400):
                assert t.do_tmem_op(cid, abi.gen_record(abi.TMEM_PUT_PAGE, pool, 1, i % 50), frame) == 1
                rc = t.do_tmem_op(cid, abi.gen_record(abi.TMEM_GET_PAGE, pool, 1, (i * 3) % 50), out)
                assert rc in (0, 1, -1001) and (rc != 1 or out == frame)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=python_client, args=(c,)) for c in (1, 2, 3)]
    threads += [threading.Thread(target=abi_client, args=(c,)) for c in (4, 5, 6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not any(th.is_alive() for th in threads)
    assert not errors, errors
    t.check()
    assert t.npages <= 32
