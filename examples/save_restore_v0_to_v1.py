"""Save a client from a v0 host (Xen 4.0.0) and restore it on a v1 host (Xen 4.1).

Xen itself could not do this: libxc never compared stream versions, so a v0 stream on a v1
host failed at RESTORE_NEW (or was misframed). tmemcore refuses the mismatch with a clear
message and converts on request. Run: ``python examples/save_restore_v0_to_v1.py``.
"""

from __future__ import annotations

import io

from tmemcore import Oid, Tmem, abi
from tmemcore.errors import StreamError
from tmemcore.savestream import convert, decode_stream, restore_client, save_client

GUEST = 1
PAGES = {(0x1111, 0): b"first page ".ljust(4096, b"."), (0x2222, 7): b"second page".ljust(4096, b"-")}


def v0_guest_fills(host: Tmem) -> None:
    """A 2010 v0 guest: 40-byte records, no version bits in NEW_POOL's flags."""
    flags = abi.pool_flags(persistent=True, version=abi.SPEC_V0)
    pool_id = host.do_tmem_op(GUEST, abi.new_pool_record(flags, version=abi.SPEC_V0))
    for (oid, index), data in PAGES.items():
        record = abi.gen_record(abi.TMEM_PUT_PAGE, pool_id, oid, index, version=abi.SPEC_V0)
        assert host.do_tmem_op(GUEST, record, bytearray(data)) == 1


def main() -> None:
    old_host = Tmem(memory_pages=16, spec_version=abi.SPEC_V0)
    v0_guest_fills(old_host)
    stream = io.BytesIO()
    size = save_client(old_host, GUEST, stream)
    image = decode_stream(stream.getvalue())
    print(f"saved client {GUEST} from a v0 host: {size} bytes, stream v{image.version}, "
          f"{sum(len(p.pages) for p in image.pools)} pages")

    new_host = Tmem(memory_pages=16)  # spec_version 1, v0 not accepted
    try:
        restore_client(new_host, GUEST, io.BytesIO(stream.getvalue()))
    except StreamError as exc:
        print(f"plain restore refused: {exc}")

    restore_client(new_host, GUEST, io.BytesIO(stream.getvalue()), convert=True)
    new_host.check()
    for (oid, index), data in PAGES.items():
        page = bytearray(abi.PAGE_SIZE)  # a v1 guest reads with 56-byte records
        rc = new_host.do_tmem_op(GUEST, abi.gen_record(abi.TMEM_GET_PAGE, 0, oid, index), page)
        print(f"v1 GET oid {oid:#x} index {index}: rc {rc}, {bytes(page[:11])!r}, intact={page == data}")

    wide = new_host.client(GUEST).handle(0)
    wide.put(Oid.from_words(1, 2, 3), 0, bytes(abi.PAGE_SIZE))  # a 192-bit oid only v1 can name
    again = io.BytesIO()
    save_client(new_host, GUEST, again)
    try:
        convert(decode_stream(again.getvalue()), abi.SPEC_V0)
    except StreamError as exc:
        print(f"back to v0 refused: {exc}")


if __name__ == "__main__":
    main()
