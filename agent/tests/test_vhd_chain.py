"""Differencing chains: our reader, libvhdi as a second reader, and merging."""

import io
import itertools
import random

import pytest
from reclo_agent.vhd import (
    ChainReader,
    VHDError,
    VHDReader,
    VHDWriter,
    make_bitmap,
    merge_chain,
    open_chain,
    validate,
)

MIB = 1024 * 1024
SIZE = 7 * MIB + 512 * 5  # four blocks, the last one partial


def build_chain(kit, depth, size=SIZE, page=4096):
    """``depth`` restore points, base first, as (vhd bytes, raw disk) pairs."""
    disk = kit.make_disk(size, seed=depth)
    vhd = kit.dynamic_vhd(disk)
    chain = [(vhd, bytes(disk))]
    for n in range(1, depth):
        new = kit.change_pages(disk, seed=100 + n, count=40, page=page)
        # A page rewritten with zeros must read as zeros, not as the parent.
        new[MIB + page * n : MIB + page * (n + 1)] = bytes(page)
        parent = VHDReader(io.BytesIO(chain[-1][0])).info.as_parent(f"restore-{n - 1}.vhd")
        chain.append((kit.differencing_vhd(disk, new, parent, page=page), bytes(new)))
        disk = new
    return chain


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_chain_reads_the_top_disk(kit, depth):
    chain = build_chain(kit, depth)
    reader = open_chain([io.BytesIO(vhd) for vhd, _ in chain])
    top = chain[-1][1]
    kit.same(reader.read(0, SIZE), top)
    kit.same(reader.read(MIB - 700, 5000), top[MIB - 700 : MIB + 4300])
    blocks = dict(reader.iter_blocks())
    for index in range(reader.block_count):
        expected = top[index * 2 * MIB : (index + 1) * 2 * MIB]
        kit.same(blocks.get(index, bytes(len(expected))), expected)


def test_differencing_header_names_its_parent(kit):
    (base, _), (inc, _) = build_chain(kit, 2)
    base_info = validate(io.BytesIO(base), expected_kind="full")
    info = validate(io.BytesIO(inc), expected_kind="incremental", parent_unique_id=base_info.unique_id)
    assert info.parent_name == "restore-0.vhd"
    assert info.parent_timestamp == base_info.timestamp
    header = VHDReader(io.BytesIO(inc)).header
    w2ku, w2ru = header.locators[:2]
    assert (w2ku.code, w2ru.code) == (b"W2ku", b"W2ru")
    assert inc[w2ku.data_offset : w2ku.data_offset + w2ku.data_length] == "restore-0.vhd".encode("utf-16-le")
    assert inc[w2ru.data_offset : w2ru.data_offset + w2ru.data_length] == ".\\restore-0.vhd".encode("utf-16-le")


def test_differencing_zero_fills_absent_sectors_and_clears_their_bits(kit):
    base_disk = kit.make_disk(2 * MIB, seed=5)
    parent = VHDReader(io.BytesIO(kit.dynamic_vhd(base_disk))).info.as_parent("base.vhd")
    out = io.BytesIO()
    with VHDWriter(out, 2 * MIB, [0], parent=parent) as writer:
        writer.write_block(0, b"\xee" * (2 * MIB), make_bitmap([(8, 8), (100, 1)], 512))
    reader = VHDReader(io.BytesIO(out.getvalue()))
    assert reader.read_bitmap(0)[:13] == b"\x00\xff" + bytes(10) + b"\x08"
    data = reader.read_block_data(0)
    kit.same(data[8 * 512 : 16 * 512], b"\xee" * 4096)
    assert data[100 * 512 : 101 * 512] == b"\xee" * 512
    assert data.count(0xEE) == 9 * 512  # everything else zero-filled


def test_sub_byte_bitmaps_resolve_per_sector(kit):
    """Sector-granular changes (not whole bitmap bytes) read right in our reader."""
    rnd = random.Random(9)
    base = kit.make_disk(4 * MIB, seed=9)
    vhd = kit.dynamic_vhd(base)
    new = bytearray(base)
    runs = {0: [(0, 1), (3, 2), (9, 1), (20, 3), (4095, 1)], 1: [(1, 1), (7, 1), (4000, 9)]}
    for index, block_runs in runs.items():
        for start, count in block_runs:
            at = index * 2 * MIB + start * 512
            new[at : at + count * 512] = rnd.randbytes(count * 512)
    parent = VHDReader(io.BytesIO(vhd)).info.as_parent("base.vhd")
    out = io.BytesIO()
    with VHDWriter(out, len(new), runs, parent=parent) as writer:
        for index in sorted(runs):
            data = bytes(new[index * 2 * MIB : (index + 1) * 2 * MIB])
            writer.write_block(index, data, make_bitmap(runs[index], 512))
    kit.same(open_chain([io.BytesIO(vhd), io.BytesIO(out.getvalue())]).read(0, len(new)), new)


def test_allocated_block_with_no_sectors_reads_from_the_parent(kit):
    base = kit.make_disk(2 * MIB, seed=2)
    vhd = kit.dynamic_vhd(base)
    out = io.BytesIO()
    with VHDWriter(out, 2 * MIB, [0], parent=VHDReader(io.BytesIO(vhd)).info.as_parent("b.vhd")) as w:
        w.write_block(0, bytes(2 * MIB), bytes(512))
    kit.same(open_chain([io.BytesIO(vhd), io.BytesIO(out.getvalue())]).read(0, 2 * MIB), base)


def _pyvhdi_chain(pyvhdi, paths):
    files = []
    for path in paths:
        f = pyvhdi.file()
        f.open(path)
        files.append(f)
    # libvhdi needs each parent opened and attached by hand.
    for parent, child in itertools.pairwise(files):
        child.set_parent(parent)
    return files


@pytest.mark.parametrize("depth", [2, 3])
def test_libvhdi_reads_our_chains(kit, depth, tmp_files, pyvhdi):
    chain = build_chain(kit, depth)
    paths = [tmp_files(f"restore-{n}.vhd", vhd) for n, (vhd, _) in enumerate(chain)]
    files = _pyvhdi_chain(pyvhdi, paths)
    top = files[-1]
    assert top.get_media_size() == SIZE
    assert top.get_parent_identifier() == str(VHDReader(io.BytesIO(chain[-2][0])).info.unique_id)
    assert top.get_parent_filename() == f"restore-{depth - 2}.vhd"
    kit.same(top.read_buffer_at_offset(SIZE, 0), chain[-1][1])
    for f in files:
        f.close()


@pytest.mark.xfail(
    strict=True,
    reason="libvhdi-python 20260901 misreads a clear bit that follows a set bit in the same bitmap byte "
    "(libvhdi_block_descriptor_read_sector_bitmap_data shifts without masking); the agent's bitmaps are "
    "page-granular (whole bytes), which libvhdi reads right",
)
def test_libvhdi_sub_byte_bitmaps(kit, tmp_files, pyvhdi):
    base = kit.make_disk(2 * MIB, seed=4)
    vhd = kit.dynamic_vhd(base)
    new = bytearray(base)
    new[3 * 512 : 5 * 512] = b"z" * 1024
    out = io.BytesIO()
    with VHDWriter(out, 2 * MIB, [0], parent=VHDReader(io.BytesIO(vhd)).info.as_parent("b.vhd")) as w:
        w.write_block(0, bytes(new), make_bitmap([(3, 2)], 512))
    kit.same(open_chain([io.BytesIO(vhd), io.BytesIO(out.getvalue())]).read(0, 2 * MIB), new)  # ours: right
    files = _pyvhdi_chain(pyvhdi, [tmp_files("b.vhd", vhd), tmp_files("i.vhd", out.getvalue())])
    kit.same(files[-1].read_buffer_at_offset(2 * MIB, 0), new)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_merge_equals_the_top_of_the_chain(kit, depth):
    chain = build_chain(kit, depth)
    reader = open_chain([io.BytesIO(vhd) for vhd, _ in chain])
    out = io.BytesIO()
    info = merge_chain(reader, out)
    merged = validate(io.BytesIO(out.getvalue()), expected_kind="full", virtual_size=SIZE)
    assert merged == info
    # Keeps the top's id, so the next incremental still chains onto it.
    assert merged.unique_id == reader.top.info.unique_id
    kit.same(VHDReader(io.BytesIO(out.getvalue())).read(0, SIZE), chain[-1][1])


def test_merged_base_takes_the_next_incremental(kit):
    """Retention: merge base+inc1, then inc2 still reads on top of it."""
    chain = build_chain(kit, 3)
    out = io.BytesIO()
    merge_chain(open_chain([io.BytesIO(chain[0][0]), io.BytesIO(chain[1][0])]), out)
    reader = open_chain([io.BytesIO(out.getvalue()), io.BytesIO(chain[2][0])])
    kit.same(reader.read(0, SIZE), chain[2][1])


def test_merge_into_a_qemu_readable_vhd(kit, tmp_files, require_tool):
    import subprocess

    qemu_img = require_tool("qemu-img")
    chain = build_chain(kit, 3)
    out = io.BytesIO()
    merge_chain(open_chain([io.BytesIO(vhd) for vhd, _ in chain]), out)
    result = subprocess.run(
        [
            qemu_img,
            "compare",
            "-f",
            "vpc",
            tmp_files("m.vhd", out.getvalue()),
            "-F",
            "raw",
            tmp_files("m.raw", chain[-1][1]),
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_chain_links_are_checked(kit):
    chain = build_chain(kit, 3)
    readers = [VHDReader(io.BytesIO(vhd)) for vhd, _ in chain]
    with pytest.raises(VHDError, match="parent id"):
        ChainReader([readers[0], readers[2]])
    with pytest.raises(VHDError, match="base of a chain"):
        ChainReader([readers[1], readers[2]])
    with pytest.raises(VHDError, match="not a differencing"):
        ChainReader([readers[0], readers[0]])
    other = VHDReader(io.BytesIO(kit.dynamic_vhd(kit.make_disk(SIZE + 2 * MIB))))
    parent = other.info.as_parent("x.vhd")
    out = io.BytesIO()
    VHDWriter(out, SIZE, [], parent=parent).close()
    with pytest.raises(VHDError, match="bytes, its parent"):
        ChainReader([other, VHDReader(io.BytesIO(out.getvalue()))])
