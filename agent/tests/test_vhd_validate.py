"""The validator of untrusted uploads: each corruption with its reason, and fuzzing."""

import dataclasses
import io
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reclo_agent.vhd import VHDError, VHDReader, VHDWriter, validate, write_dynamic_from_raw, write_fixed
from reclo_agent.vhd.format import DynamicHeader, Footer, ParentLocator, checksum

MIB = 1024 * 1024
SIZE = 5 * MIB + 512 * 3


@pytest.fixture(scope="module")
def full(kit):
    return kit.dynamic_vhd(kit.make_disk(SIZE, seed=1))


@pytest.fixture(scope="module")
def incremental(kit, full):
    old = kit.make_disk(SIZE, seed=1)
    new = kit.change_pages(old, seed=2, count=20)
    parent = VHDReader(io.BytesIO(full)).info.as_parent("full.vhd")
    return kit.differencing_vhd(old, new, parent)


def with_footer(vhd: bytes, copy_too: bool = True, **changes) -> bytes:
    """``vhd`` with footer fields changed (checksum kept valid)."""
    footer = dataclasses.replace(Footer.unpack(vhd[-512:]), **changes).pack()
    return (footer if copy_too else vhd[:512]) + vhd[512:-512] + footer


def with_header(vhd: bytes, **changes) -> bytes:
    """``vhd`` with dynamic header fields changed (checksum kept valid)."""
    header = dataclasses.replace(DynamicHeader.unpack(vhd[512:1536]), **changes).pack()
    return vhd[:512] + header + vhd[1536:]


def with_bat(vhd: bytes, index: int, value: int) -> bytes:
    at = 1536 + 4 * index
    return vhd[:at] + value.to_bytes(4, "big") + vhd[at + 4 :]


def check(data: bytes, reason: str, **expect):
    with pytest.raises(VHDError, match=reason):
        validate(io.BytesIO(data), **expect)


def test_valid_files_pass(full, incremental):
    base = validate(io.BytesIO(full), expected_kind="full", virtual_size=SIZE)
    assert (base.disk_type, base.kind, base.parent_unique_id, base.block_size) == ("dynamic", "full", None, 2 * MIB)
    assert base.allocated_blocks == 2  # block 1 is all zeros
    inc = validate(
        io.BytesIO(incremental), expected_kind="incremental", parent_unique_id=base.unique_id, virtual_size=SIZE
    )
    assert (inc.disk_type, inc.kind, inc.parent_unique_id) == ("differencing", "incremental", base.unique_id)


def test_footer_corruptions(full):
    check(b"", "too small")
    check(b"x" * 100 + full[-512:][:-1], "too small|cookie")
    check(full[:-512] + b"X" + full[-511:], "footer: bad cookie")
    check(full[:-400] + b"\x01" + full[-399:], "footer: checksum mismatch")
    check(with_footer(full, copy_too=False, timestamp=1), "footer copy at the start differs")
    check(with_footer(full, format_version=0x00020000), "unsupported file format version")
    check(with_footer(full, disk_type=5), "unsupported disk type 5")
    check(with_footer(full, current_size=SIZE + 1), "virtual size")
    check(with_footer(full, current_size=0), "virtual size")
    check(with_footer(full, current_size=4096 * 1024**3), "virtual size")
    check(with_footer(full, data_offset=1024), "dynamic header offset")
    check(full[:-1], "footer")  # truncated: the footer is no longer at the end


def test_header_corruptions(full):
    check(full[:512] + b"Y" + full[513:], "dynamic disk header: bad cookie")
    check(full[:700] + b"\x01" + full[701:], "dynamic disk header: checksum mismatch")
    check(with_header(full, header_version=0x00020000), "unsupported header version")
    check(with_header(full, block_size=3 * MIB), "block size .* power of two")
    check(with_header(full, block_size=512), "block size")
    check(with_header(full, block_size=1 << 30), "block size")
    check(with_header(full, max_table_entries=2), "BAT has 2 entries but the disk has 3 blocks")
    check(with_header(full, max_table_entries=0xFFFFFFFF), "does not fit")
    check(with_header(full, table_offset=len(full)), "does not fit")
    check(with_header(full, table_offset=1024), "dynamic header and BAT overlap")
    check(with_header(full, table_offset=0xFFFFFFFFFFFFFFFF), "does not fit")


def test_bat_corruptions(full):
    reader = VHDReader(io.BytesIO(full))
    first = reader.bat_entry(0)
    second = reader.bat_entry(2)
    check(with_bat(full, 1, 0xFFFFFFFE), "block 1 points outside the file")
    check(with_bat(full, 1, (len(full) - 512) // 512), "block 1 points outside the file")
    check(with_bat(full, 2, first + 1), "blocks 0 and 2 overlap")
    check(with_bat(full, 0, 2), "block 0 overlaps the dynamic header")
    check(with_bat(full, 0, 0), "block 0 overlaps the footer copy")
    check(with_bat(full, 2, second - 1), "overlap")
    # A truncated data area: the last block no longer fits.
    check(full[: -512 - MIB] + full[-512:], "points outside the file")


def test_parent_locator_corruptions(incremental):
    header = DynamicHeader.unpack(incremental[512:1536])
    bad = (ParentLocator(b"W2ku", 512, 26, len(incremental)),) + header.locators[1:]
    check(with_header(incremental, locators=bad), "parent locator 0 .* outside the file")
    bad = (ParentLocator(b"W2ku", 512, 26, 1536),) + header.locators[1:]
    check(with_header(incremental, locators=bad), "BAT and parent locator 0 overlap")


def test_expectations(full, incremental):
    full_id = validate(io.BytesIO(full)).unique_id
    check(full, "a incremental backup must be a differencing VHD, this one is dynamic", expected_kind="incremental")
    check(incremental, "a full backup must be a dynamic VHD, this one is differencing", expected_kind="full")
    check(incremental, "parent id .* does not match", parent_unique_id=uuid.uuid4())
    check(full, "parent id None does not match", parent_unique_id=full_id)
    check(full, f"virtual size {SIZE} does not match the expected {SIZE + 512}", virtual_size=SIZE + 512)
    with pytest.raises(ValueError, match="expected_kind"):
        validate(io.BytesIO(full), expected_kind="differential")


def test_fixed_corruptions(kit):
    out = io.BytesIO()
    write_fixed(io.BytesIO(bytes(kit.make_disk(MIB))), out)
    fixed = out.getvalue()
    assert validate(io.BytesIO(fixed)).disk_type == "fixed"
    check(fixed, "a full backup must be a dynamic VHD", expected_kind="full")
    check(fixed[512:], "fixed VHD file is")
    check(with_footer(fixed, copy_too=False, current_size=2 * MIB), "fixed VHD file is")
    check(with_footer(fixed, copy_too=False, data_offset=512), "data offset")


# Fuzzing: random damage to small valid VHDs must either still validate or
# raise VHDError -- never another exception, a hang or a huge allocation.
# Small blocks keep the metadata a large part of each file.


def _sample_files():
    rnd_disk = bytes(range(256)) * 64  # 16 KiB
    disk = rnd_disk[:4096] + bytes(4096) + rnd_disk[: 4096 + 1024]  # 4 KiB blocks, the last one partial
    dynamic = io.BytesIO()
    info = write_dynamic_from_raw(io.BytesIO(disk), dynamic, block_size=4096)
    differencing = io.BytesIO()
    with VHDWriter(differencing, len(disk), [0, 3], parent=info.as_parent("p.vhd"), block_size=4096) as w:
        w.write_block(0, disk[:4096], b"\x3c")
        w.write_block(3, disk[12288:], b"\xff")
    fixed = io.BytesIO()
    write_fixed(io.BytesIO(disk[:2048]), fixed)
    return [dynamic.getvalue(), differencing.getvalue(), fixed.getvalue()]


SAMPLES = _sample_files()


def _refresh_checksums(data: bytearray) -> None:
    """Make mutated structures pass their checksums, to reach deeper checks."""
    if len(data) >= 512:
        end = len(data) - 512
        data[end + 64 : end + 68] = bytes(4)
        data[end + 64 : end + 68] = checksum(data[end:]).to_bytes(4, "big")
        if len(data) >= 2048:
            data[:512] = data[end:]
            data[512 + 36 : 512 + 40] = bytes(4)
            data[512 + 36 : 512 + 40] = checksum(data[512:1536]).to_bytes(4, "big")


INTERESTING = [0, 1, 0x200, 0x600, 0x1000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]


@st.composite
def damaged(draw):
    data = bytearray(draw(st.sampled_from(SAMPLES)))
    n = len(data)
    for _ in range(draw(st.integers(1, 6))):
        # Mostly in the metadata: header, BAT and locators, then the footer.
        at = draw(st.one_of(st.integers(512, min(n, 2600) - 1), st.integers(n - 512, n - 1), st.integers(0, n - 1)))
        if draw(st.booleans()):
            data[at] = draw(st.integers(0, 255))
        else:
            at -= at % 4
            data[at : at + 4] = draw(st.sampled_from(INTERESTING)).to_bytes(4, "big")
    # Cut or grow the file: before the footer (keeping it), or anywhere.
    change = draw(st.sampled_from([None, None, None, "drop", "insert", "truncate"]))
    if change == "drop":
        at = draw(st.integers(0, len(data) - 512))
        del data[at : at + draw(st.sampled_from([1, 4, 512, 4096]))]
    elif change == "insert":
        at = draw(st.integers(0, len(data) - 512))
        data[at:at] = bytes(draw(st.sampled_from([1, 511, 512, 4096])))
    elif change == "truncate":
        del data[draw(st.integers(0, len(data) - 1)) :]
    if draw(st.sampled_from([True, True, True, False])):
        _refresh_checksums(data)
    return bytes(data)


@settings(max_examples=600, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(damaged())
def test_fuzz_validator_raises_only_vhderror(data):
    try:
        info = validate(io.BytesIO(data))
    except VHDError:
        return
    # Whatever validates reads without any error: every block is inside the file.
    reader = VHDReader(io.BytesIO(data))
    assert reader.info == info
    reader.read(0, min(info.virtual_size, 64 * 1024))
    reader.read(max(0, info.virtual_size - 4096), 4096)
    for index in range(reader.block_count):
        if reader.is_allocated(index):
            assert len(reader.read_bitmap(index)) == 512
            assert len(reader.read_block_data(index)) == reader.block_size
