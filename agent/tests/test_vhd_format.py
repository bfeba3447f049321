"""VHD structures: geometry, checksums, footer/header round trips, bitmaps."""

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st
from reclo_agent.vhd import bitmap
from reclo_agent.vhd.format import (
    CREATOR_APP,
    DiskType,
    DynamicHeader,
    Footer,
    ParentLocator,
    bitmap_size,
    checksum,
    chs_geometry,
)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        # Values computed by hand from the specification's algorithm.
        (3 * 1024 * 1024 + 512 * 7, (90, 4, 17)),  # 6151 sectors: 361 cyl*heads, 4 heads
        (1024**3, (2080, 16, 63)),  # 2097152 sectors: 17 and 31 spt overflow
        (127 * 1024**3, (65278, 16, 255)),  # past 65535*16*63 sectors: 255 spt
        (2040 * 1024**3, (65535, 16, 255)),  # capped at 65535*16*255 sectors
    ],
)
def test_chs_geometry_follows_the_spec(size, expected):
    assert chs_geometry(size) == expected


def test_chs_geometry_never_exceeds_the_disk():
    for sectors in (1, 17, 1000, 70000, 1 << 20, 31 * 16 * 1024 + 5, 4 << 20):
        cyl, heads, spt = chs_geometry(sectors * 512)
        assert cyl * heads * spt <= sectors


def test_checksum_is_ones_complement_of_the_byte_sum():
    assert checksum(b"\x01\x02") == 0xFFFFFFFC
    assert checksum(b"") == 0xFFFFFFFF


def test_footer_round_trip_and_layout():
    uid = uuid.uuid4()
    raw = Footer(DiskType.DYNAMIC, 3 * 1024 * 1024, uid, 1234, 512).pack()
    assert len(raw) == 512
    assert raw[:8] == b"conectix"
    assert raw[28:32] == CREATOR_APP == b"win "
    assert int.from_bytes(raw[40:48], "big") == int.from_bytes(raw[48:56], "big") == 3 * 1024 * 1024
    assert raw[68:84] == uid.bytes
    footer = Footer.unpack(raw)
    assert (footer.disk_type, footer.current_size, footer.unique_id, footer.timestamp) == (3, 3 << 20, uid, 1234)
    assert footer.geometry == chs_geometry(3 * 1024 * 1024)


def test_header_round_trip_with_parent():
    parent = uuid.uuid4()
    locators = (ParentLocator(b"W2ku", 512, 10, 4096), ParentLocator(b"W2ru", 512, 14, 4608))
    header = DynamicHeader(1536, 7, 2 << 20, parent, 99, "base.vhd", locators)
    raw = header.pack()
    assert len(raw) == 1024
    assert raw[64 : 64 + 16] == "base.vhd".encode("utf-16-be")
    back = DynamicHeader.unpack(raw)
    assert back.parent_name == "base.vhd"
    assert back.locators[:2] == locators
    assert back.locators[2].code == b"\0\0\0\0"
    assert (back.table_offset, back.max_table_entries, back.block_size, back.parent_unique_id) == (
        1536,
        7,
        2 << 20,
        parent,
    )


def test_bitmap_size_is_padded_to_a_sector():
    assert bitmap_size(2 << 20) == 512
    assert bitmap_size(4096) == 512
    assert bitmap_size(64 << 20) == 16384


def test_bitmaps_are_msb_first():
    assert bitmap.make_bitmap([(0, 1)], 2) == b"\x80\x00"
    assert bitmap.make_bitmap([(3, 2)], 1) == b"\x18"
    assert bitmap.make_bitmap([(7, 3)], 2) == b"\x01\xc0"
    assert bitmap.set_runs(b"\x80\x00\xff\x01", 32) == [(0, 1), (16, 8), (31, 1)]


@given(st.lists(st.tuples(st.integers(0, 127), st.integers(0, 40)), max_size=8))
def test_bitmap_runs_round_trip(runs):
    runs = [(start, min(count, 128 - start)) for start, count in runs]
    bits = set()
    for start, count in runs:
        bits.update(range(start, start + count))
    bm = bitmap.make_bitmap(runs, 16)
    got = bitmap.set_runs(bm, 128)
    assert {s for start, count in got for s in range(start, start + count)} == bits
    assert all(count > 0 for _, count in got)
    clear = {s for start, count in bitmap.clear_runs(bm, 128) for s in range(start, start + count)}
    assert clear == set(range(128)) - bits
    assert bitmap.from_int(bitmap.to_int(bm, 128), 128, 16) == bm
