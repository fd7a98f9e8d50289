"""The save-stream codec on its own: framing, validation, conversion (no host needed)."""

from __future__ import annotations

import io
import struct
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tmemcore import abi
from tmemcore.errors import StreamError
from tmemcore.oid import INVALID_OID, V0_OID_MAX, Oid
from tmemcore.savestream import (
    ClientImage,
    PoolImage,
    convert,
    decode_stream,
    encode_stream,
    read_stream,
    write_stream,
)

PAGE_A = bytes(range(256)) * 16
PAGE_B = b"\xab" * abi.PAGE_SIZE


def persistent_flags(version: int = abi.SPEC_V1, shared: bool = False) -> int:
    return abi.pool_flags(persistent=True, shared=shared, version=version)


def sample_image(version: int = abi.SPEC_V1, live: bool = False) -> ClientImage:
    return ClientImage(
        version=version,
        flags=abi.TMEM_CLIENT_COMPRESS,
        weight=3,
        cap=7,
        pools=[
            PoolImage(0, abi.pool_flags(version=version), 0),
            PoolImage(2, persistent_flags(version), 2, (0, 0), [(Oid(5), 1, PAGE_A), (Oid(6), 0, PAGE_B)]),
        ],
        invalidated=[(2, Oid(9), 4)] if live else None,
    )


def test_round_trip_keeps_every_field():
    for version in abi.SPEC_VERSIONS:
        for live in (False, True):
            image = sample_image(version, live)
            assert decode_stream(encode_stream(image)) == image


def test_write_stream_returns_the_byte_count_and_matches_encode():
    buf = io.BytesIO()
    n = write_stream(sample_image(), buf)
    assert n == len(buf.getvalue()) == len(encode_stream(sample_image()))


def test_v1_layout_is_byte_exact():
    raw = encode_stream(sample_image(abi.SPEC_V1, live=True))
    header = struct.unpack_from("<iIIIIIII", raw)
    assert header == (-5, 1, 16, 0xFFFFFFFF, 1, 3, 7, 0xFFFFFFFF)
    at = 32
    assert struct.unpack_from("<IIIQQ", raw, at) == (0, abi.pool_flags(version=1), 0, 0, 0)
    at += 28  # ephemeral pool: header only
    assert struct.unpack_from("<IIIQQ", raw, at) == (2, persistent_flags(1), 2, 0, 0)
    at += 28
    assert raw[at : at + 24] == (5).to_bytes(24, "little")
    assert struct.unpack_from("<I", raw, at + 24) == (1,)
    assert raw[at + 28 : at + 28 + 4096] == PAGE_A
    at += 28 + 4096 + 28 + 4096  # second page, no terminator (list complete)
    assert struct.unpack_from("<I", raw, at) == (0xFFFFFFFF,)
    assert struct.unpack_from("<iI", raw, at + 4) == (-6, 2)
    assert raw[at + 12 : at + 36] == (9).to_bytes(24, "little")
    assert struct.unpack_from("<II", raw, at + 36) == (4, 0xFFFFFFFF)
    assert len(raw) == at + 44


def test_v0_records_use_eight_byte_oids():
    v1 = encode_stream(sample_image(abi.SPEC_V1, live=True))
    v0 = encode_stream(sample_image(abi.SPEC_V0, live=True))
    assert len(v1) - len(v0) == 3 * 16  # two page records and one extra record, 16 bytes shorter each


def test_ephemeral_pool_n_pages_is_forced_to_zero():
    image = ClientImage(version=1, pools=[PoolImage(0, abi.pool_flags(version=1), 42)])
    raw = encode_stream(image)
    assert struct.unpack_from("<III", raw, 32) == (0, abi.pool_flags(version=1), 0)


def test_terminator_written_only_when_the_list_ran_out_early():
    short = ClientImage(version=1, pools=[PoolImage(1, persistent_flags(), 3, (1, 2), [(Oid(1), 0, PAGE_A)])])
    raw = encode_stream(short)
    terminator_at = 32 + 28 + 28 + 4096
    assert raw[terminator_at : terminator_at + 24] == b"\xff" * 24
    assert raw[terminator_at + 24 :] == struct.pack("<I", 0xFFFFFFFF)
    parsed = decode_stream(raw)
    assert parsed == short and parsed.pools[0].terminated
    assert not sample_image().pools[1].terminated


def test_v0_terminator_is_eight_bytes():
    short = ClientImage(version=0, pools=[PoolImage(1, persistent_flags(0), 2, (0, 0), [])])
    raw = encode_stream(short)
    assert raw[32 + 28 :] == b"\xff" * 8 + struct.pack("<I", 0xFFFFFFFF)
    assert decode_stream(raw).pools[0].pages == []


def test_a_pre_4_3_stream_without_pool_version_bits_is_accepted():
    image = ClientImage(version=1, pools=[PoolImage(0, abi.TMEM_POOL_PERSIST, 0)])
    assert decode_stream(encode_stream(image)).pools[0].flags == abi.TMEM_POOL_PERSIST


@pytest.mark.parametrize(
    "mutate, offset, words",
    [
        (lambda raw: struct.pack("<i", -4) + raw[4:], 0, "marker is -4"),
        (lambda raw: raw[:4] + struct.pack("<I", 7) + raw[8:], 4, "version 7"),
        (lambda raw: raw[:8] + struct.pack("<I", 17) + raw[12:], 8, "max_pools 17"),
        (lambda raw: raw[:12] + b"\0\0\0\0" + raw[16:], 12, "separator"),
        (lambda raw: raw[:16] + struct.pack("<I", 4) + raw[20:], 16, "client flags"),
        (lambda raw: raw[:28] + b"\0\0\0\0" + raw[32:], 28, "separator"),
        (lambda raw: raw[:32] + struct.pack("<I", 16) + raw[36:], 32, "pool id 16"),
        (lambda raw: raw + b"junk", None, "trailing data"),
    ],
)
def test_framing_errors_name_the_offset(mutate, offset, words):
    raw = mutate(encode_stream(sample_image()))
    with pytest.raises(StreamError) as caught:
        decode_stream(raw)
    message = str(caught.value)
    assert words in message and "\n" not in message
    if offset is not None:
        assert f"offset {offset}:" in message


def test_truncation_names_the_offset():
    raw = encode_stream(sample_image())
    with pytest.raises(StreamError, match=r"truncated stream at offset 116: page data in pool 2 \(record at 88\) needs 4096 bytes, got 34"):
        decode_stream(raw[:150])


def test_ephemeral_pool_with_pages_is_refused():
    raw = bytearray(encode_stream(ClientImage(version=1, pools=[PoolImage(0, abi.pool_flags(version=1), 0)])))
    struct.pack_into("<I", raw, 40, 1)
    with pytest.raises(StreamError, match="ephemeral"):
        decode_stream(bytes(raw))


def test_extra_record_for_an_unknown_pool_is_refused():
    image = sample_image(live=True)
    image.invalidated = [(5, Oid(1), 0)]
    with pytest.raises(StreamError, match="pool 5"):
        encode_stream(image)


def test_writer_refuses_what_it_cannot_frame():
    bad_pages = [
        [(INVALID_OID, 0, PAGE_A)],  # the v1 terminator
        [(Oid(1), 0, b"short")],
        [(Oid(1), 1 << 32, PAGE_A)],
    ]
    for pages in bad_pages:
        image = ClientImage(version=1, pools=[PoolImage(0, persistent_flags(), 1, (0, 0), pages)])
        with pytest.raises(StreamError):
            encode_stream(image)
    too_wide = ClientImage(version=0, pools=[PoolImage(0, persistent_flags(0), 1, (0, 0), [(Oid(1 << 64), 0, PAGE_A)])])
    with pytest.raises(StreamError, match="does not fit a v0 stream"):
        encode_stream(too_wide)


def test_read_stream_stops_at_end_of_file_without_extra_section():
    stream = io.BytesIO(encode_stream(sample_image()))
    assert read_stream(stream).invalidated is None


# ------------------------------------------------------------------ conversion


def test_convert_v0_to_v1_widens_oids_and_sets_version_bits():
    v0 = sample_image(abi.SPEC_V0, live=True)
    v1 = convert(v0, abi.SPEC_V1)
    assert v1 == sample_image(abi.SPEC_V1, live=True)
    assert v0.version == 0  # input untouched
    assert all(abi.flags_version(pool.flags) == 1 for pool in v1.pools)


def test_convert_v1_to_v0_when_everything_fits():
    assert convert(sample_image(abi.SPEC_V1, live=True), abi.SPEC_V0) == sample_image(abi.SPEC_V0, live=True)


def test_convert_v1_to_v0_names_the_first_wide_oid():
    image = sample_image(abi.SPEC_V1)
    image.pools[1].pages.append((Oid.from_words(1, 2, 0), 9, PAGE_A))
    image.pools[1].n_pages = 3
    with pytest.raises(StreamError, match=r"pool 2 page oid Oid\(0x1, 0x2, 0x0\) index 9"):
        convert(image, abi.SPEC_V0)


def test_convert_v1_to_v0_refuses_an_invalidated_wide_oid():
    image = sample_image(abi.SPEC_V1, live=True)
    image.invalidated = [(2, Oid.from_words(0, 0, 1), 3)]
    with pytest.raises(StreamError, match="invalidated oid"):
        convert(image, abi.SPEC_V0)


def test_convert_refuses_the_v0_terminator_value_as_a_page_oid():
    image = ClientImage(version=1, pools=[PoolImage(0, persistent_flags(), 1, (0, 0), [(Oid(V0_OID_MAX), 0, PAGE_A)])])
    with pytest.raises(StreamError, match="does not fit"):
        convert(image, abi.SPEC_V0)


def test_convert_to_an_unknown_version_is_refused():
    with pytest.raises(StreamError):
        convert(sample_image(), 2)


# ------------------------------------------------------------------ properties

oids_v0 = st.integers(0, V0_OID_MAX - 1).map(Oid)
oids_v1 = st.integers(0, int(INVALID_OID) - 1).map(Oid)
small_pages = st.sampled_from([PAGE_A, PAGE_B, bytes(abi.PAGE_SIZE)])


@st.composite
def images(draw: st.DrawFn) -> ClientImage:
    version = draw(st.sampled_from(abi.SPEC_VERSIONS))
    oids = oids_v1 if version == abi.SPEC_V1 else oids_v0
    pool_ids = sorted(draw(st.sets(st.integers(0, 15), max_size=4)))
    pools = []
    for pool_id in pool_ids:
        persistent = draw(st.booleans())
        pages = draw(st.lists(st.tuples(oids, st.integers(0, 0xFFFFFFFF), small_pages), max_size=3)) if persistent else []
        n_pages = len(pages) + draw(st.integers(0, 2)) if persistent else 0
        flags = abi.pool_flags(persistent=persistent, shared=draw(st.booleans()), version=version)
        uuid = (draw(st.integers(0, 2**64 - 1)), draw(st.integers(0, 2**64 - 1)))
        pools.append(PoolImage(pool_id, flags, n_pages, uuid, pages))
    invalidated = None
    if pools and draw(st.booleans()):
        invalidated = draw(st.lists(st.tuples(st.sampled_from(pool_ids), oids, st.integers(0, 0xFFFFFFFF)), max_size=3))
    return ClientImage(
        version=version,
        flags=draw(st.integers(0, 3)),
        weight=draw(st.integers(0, 0xFFFFFFFF)),
        cap=draw(st.integers(0, 0xFFFFFFFF)),
        pools=pools,
        invalidated=invalidated,
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(images())
def test_any_valid_image_round_trips(image: ClientImage):
    raw = encode_stream(image)
    assert decode_stream(raw) == image
    other = abi.SPEC_V0 if image.version == abi.SPEC_V1 else abi.SPEC_V1
    try:
        converted = convert(image, other)
    except StreamError as exc:
        assert other == abi.SPEC_V0 and "does not fit" in str(exc)
    else:
        assert convert(converted, image.version) == convert(convert(image, image.version), image.version)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_stream_error(raw: bytes):
    try:
        image = decode_stream(raw)
    except StreamError:
        return
    assert encode_stream(image) == raw  # anything accepted is canonical


@settings(max_examples=80, deadline=None)
@given(images(), st.data())
def test_truncations_and_bit_flips_are_stream_errors_or_canonical(image: ClientImage, data: st.DataObject):
    raw = encode_stream(image)
    cut = data.draw(st.integers(0, len(raw) - 1))
    main_section = replace(image, invalidated=None)
    if cut == len(encode_stream(main_section)):
        # The extra section is optional, so a cut exactly before it leaves a valid non-live stream.
        assert decode_stream(raw[:cut]) == main_section
    else:
        with pytest.raises(StreamError):
            decode_stream(raw[:cut])
    flipped = bytearray(raw)
    bit = data.draw(st.integers(0, len(raw) * 8 - 1))
    flipped[bit // 8] ^= 1 << (bit % 8)
    try:
        parsed = decode_stream(bytes(flipped))
    except StreamError:
        return
    assert encode_stream(parsed) == bytes(flipped)
