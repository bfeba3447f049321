"""Writing fixed and dynamic VHDs, read back by our reader and by qemu-img."""

import io
import json
import subprocess

import pytest
from reclo_agent.vhd import VHDError, VHDReader, VHDWriter, open_chain, validate, write_dynamic_from_raw, write_fixed
from reclo_agent.vhd.format import FOOTER_SIZE, UNALLOCATED

MIB = 1024 * 1024
SIZES = {
    "odd": 3 * MIB + 512 * 7,  # last block partial, not a multiple of 2 MiB
    "exact": 4 * MIB,
    "one-sector": 512,
    "many-blocks": 9 * MIB + 4096,
}


class NonSeekable(io.RawIOBase):
    """A write-only pipe-like output: the writers must never seek."""

    def __init__(self):
        self.buf = bytearray()

    def writable(self):
        return True

    def write(self, b):
        self.buf += b
        return len(b)


def qemu_compare(qemu_img, vhd_path, raw_path):
    result = subprocess.run(
        [qemu_img, "compare", "-f", "vpc", vhd_path, "-F", "raw", raw_path], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def qemu_virtual_size(qemu_img, vhd_path):
    out = subprocess.run(
        [qemu_img, "info", "-f", "vpc", "--output=json", vhd_path], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out)["virtual-size"]


@pytest.mark.parametrize("name", SIZES)
def test_dynamic_round_trip(name, kit):
    disk = kit.make_disk(SIZES[name], seed=len(name))
    out = NonSeekable()
    info = write_dynamic_from_raw(io.BytesIO(bytes(disk)), out)
    assert info.file_size == len(out.buf)
    reader = VHDReader(io.BytesIO(bytes(out.buf)))
    assert reader.info == info
    kit.same(reader.read(0, len(disk)), disk)
    # Reads across block boundaries, and past the end (cut short).
    assert reader.read(2 * MIB - 100, 300) == disk[2 * MIB - 100 : 2 * MIB + 200]
    assert reader.read(len(disk) - 10, 100) == disk[-10:]


@pytest.mark.parametrize("name", SIZES)
def test_fixed_round_trip(name, kit):
    disk = kit.make_disk(SIZES[name], seed=1)
    out = NonSeekable()
    info = write_fixed(io.BytesIO(bytes(disk)), out)
    assert len(out.buf) == len(disk) + FOOTER_SIZE == info.file_size
    reader = VHDReader(io.BytesIO(bytes(out.buf)))
    assert reader.info == info
    kit.same(reader.read(0, len(disk)), disk)


def test_all_zero_blocks_are_left_unallocated(kit):
    disk = bytearray(6 * MIB)
    disk[2 * MIB + 512 : 2 * MIB + 1024] = b"x" * 512  # only block 1 has data
    vhd = kit.dynamic_vhd(disk)
    reader = VHDReader(io.BytesIO(vhd))
    assert [reader.is_allocated(i) for i in range(3)] == [False, True, False]
    assert reader.info.allocated_blocks == 1
    assert len(vhd) == 512 + 1024 + 512 + (512 + 2 * MIB) + 512
    kit.same(reader.read(0, len(disk)), disk)


def test_empty_disk_has_no_blocks(kit):
    vhd = kit.dynamic_vhd(bytes(5 * MIB))
    reader = VHDReader(io.BytesIO(vhd))
    assert reader.info.allocated_blocks == 0
    assert [reader.bat_entry(i) for i in range(3)] == [UNALLOCATED] * 3
    kit.same(reader.read(0, 5 * MIB), bytes(5 * MIB))
    assert list(open_chain([io.BytesIO(vhd)]).iter_blocks()) == []


def test_last_partial_block_is_padded_and_its_tail_not_marked(kit):
    size = 2 * MIB + 512 * 3
    disk = kit.make_disk(size, seed=3)
    disk[-1] = 0x55  # make sure the last block is allocated
    reader = VHDReader(io.BytesIO(kit.dynamic_vhd(disk)))
    bm = reader.read_bitmap(1)
    assert bm[0] == 0b11100000 and not any(bm[1:])
    kit.same(reader.read_block_data(1)[: 3 * 512], disk[2 * MIB :])
    kit.same(reader.read_block_data(1)[3 * 512 :], bytes(2 * MIB - 3 * 512))


def test_writer_streams_blocks_given_by_the_caller(kit):
    """The agent's path: allocated blocks known up front, then pushed in order."""
    size = 5 * MIB
    blocks = {0: b"a" * (2 * MIB), 2: b"c" * MIB}
    out = NonSeekable()
    with VHDWriter(out, size, blocks.keys()) as writer:
        for index, data in sorted(blocks.items()):
            writer.write_block(index, data)
    reader = VHDReader(io.BytesIO(bytes(out.buf)))
    kit.same(reader.read(0, size), b"a" * (2 * MIB) + bytes(2 * MIB) + b"c" * MIB)


def test_writer_rejects_misuse():
    out = io.BytesIO()
    writer = VHDWriter(out, 4 * MIB, [0, 1])
    with pytest.raises(ValueError, match="out of order"):
        writer.write_block(1, bytes(2 * MIB))
    with pytest.raises(ValueError, match="must be"):
        writer.write_block(0, b"short")
    writer.write_block(0, bytes(2 * MIB))
    with pytest.raises(ValueError, match="never written"):
        writer.close()
    with pytest.raises(ValueError, match="outside"):
        VHDWriter(out, 4 * MIB, [2])
    with pytest.raises(ValueError, match="multiple of 512"):
        VHDWriter(out, 1000, [])
    with pytest.raises(ValueError, match="multiple of 512"):
        VHDWriter(out, 0, [])


def test_failed_write_leaves_no_footer():
    out = io.BytesIO()
    with pytest.raises(RuntimeError), VHDWriter(out, 2 * MIB, [0]):
        raise RuntimeError("source disk went away")
    with pytest.raises(VHDError):
        VHDReader(io.BytesIO(out.getvalue()))


@pytest.mark.parametrize("name", ["odd", "exact", "many-blocks"])
@pytest.mark.parametrize("kind", ["dynamic", "fixed"])
def test_qemu_img_reads_what_we_write(name, kind, kit, tmp_files, require_tool):
    qemu_img = require_tool("qemu-img")
    disk = kit.make_disk(SIZES[name], seed=7)
    out = io.BytesIO()
    (write_dynamic_from_raw if kind == "dynamic" else write_fixed)(io.BytesIO(bytes(disk)), out)
    vhd_path = tmp_files(f"{kind}.vhd", out.getvalue())
    raw_path = tmp_files("disk.raw", bytes(disk))
    assert qemu_virtual_size(qemu_img, vhd_path) == len(disk)
    qemu_compare(qemu_img, vhd_path, raw_path)
    assert validate(io.BytesIO(out.getvalue())).virtual_size == len(disk)


def test_qemu_img_reads_an_empty_disk(kit, tmp_files, require_tool):
    qemu_img = require_tool("qemu-img")
    vhd_path = tmp_files("empty.vhd", kit.dynamic_vhd(bytes(3 * MIB + 512)))
    raw_path = tmp_files("empty.raw", bytes(3 * MIB + 512))
    assert qemu_virtual_size(qemu_img, vhd_path) == 3 * MIB + 512
    qemu_compare(qemu_img, vhd_path, raw_path)


def test_we_read_what_qemu_img_writes(kit, tmp_files, tmp_path, require_tool):
    """qemu-img as an independent writer of dynamic and fixed VHDs."""
    qemu_img = require_tool("qemu-img")
    disk = kit.make_disk(6 * MIB, seed=11)
    raw_path = tmp_files("disk.raw", bytes(disk))
    for subformat in ("dynamic", "fixed"):
        vhd_path = tmp_path / f"qemu-{subformat}.vhd"
        subprocess.run(
            [
                qemu_img,
                "convert",
                "-f",
                "raw",
                "-O",
                "vpc",
                "-o",
                f"subformat={subformat},force_size=on",
                raw_path,
                str(vhd_path),
            ],
            check=True,
        )
        with open(vhd_path, "rb") as f:
            reader = VHDReader(f)
            assert reader.info.disk_type == subformat
            kit.same(reader.read(0, len(disk)), disk)
