"""The one pass: each block read once, the BAT after the data; qemu-img and zstd read what it writes."""

import io
import random
import subprocess
import uuid

import pytest
from reclo_agent.scan import pack
from reclo_agent.source import Source
from reclo_agent.vhd import VHDReader, check_seekable, open_chain, open_seekable, validate
from reclo_agent.vhd.format import DEFAULT_BLOCK_SIZE

MIB = 1024 * 1024
BLOCK = DEFAULT_BLOCK_SIZE


def disk_image(kit, size: int, *, zero_blocks=(), seed=1) -> bytearray:
    """Text-like (compressible) bytes everywhere but the blocks named, which are zeros."""
    rnd = random.Random(seed)
    words = [rnd.randbytes(rnd.randrange(3, 9)) for _ in range(500)]
    disk = bytearray()
    while len(disk) < size:
        disk += b" ".join(rnd.choices(words, k=4096))
    del disk[size:]
    for index in zero_blocks:
        disk[index * BLOCK : (index + 1) * BLOCK] = bytes(len(disk[index * BLOCK : (index + 1) * BLOCK]))
    return disk


def one_pass(tmp_path, disk: bytes, name: str, **kwargs) -> tuple[bytes, object, int]:
    """Pack ``disk`` in one pass; (stored object, the pass, bytes the source reader read)."""
    image = tmp_path / f"{name}.img"
    image.write_bytes(bytes(disk))
    out = io.BytesIO()
    with Source(str(image)) as src:
        scan, (size, _) = pack(src, out, tmp_path / f"{name}.map", page_size=4096, unique_id=uuid.uuid4(),
                               timestamp=1000, **kwargs)  # fmt: skip
        read = src.bytes_read
    assert size == len(out.getvalue())
    return out.getvalue(), scan, read


@pytest.mark.parametrize(
    ("size", "zeros"),
    [
        (9 * MIB + 4096, (1, 2)),  # zero blocks in the middle, a short last block
        (8 * MIB, (3,)),  # the last block all zeros: the BAT follows zero room
        (3 * MIB + 512, (0, 1)),  # nothing stored
    ],
)
def test_qemu_img_reads_a_one_pass_full_backup(kit, tmp_path, tmp_files, require_tool, size, zeros):
    qemu_img = require_tool("qemu-img")
    disk = disk_image(kit, size, zero_blocks=zeros)
    stored, scan, read = one_pass(tmp_path, disk, "full")
    assert read == size  # every byte read once
    vhd = open_seekable(io.BytesIO(stored)).read()
    info = validate(io.BytesIO(vhd), expected_kind="full", virtual_size=size)
    assert info.allocated_blocks == scan.stored_blocks == -(-size // BLOCK) - len(zeros)
    assert VHDReader(io.BytesIO(vhd)).header.table_offset > 2 * 512  # the BAT is after the data
    result = subprocess.run(
        [qemu_img, "compare", "-f", "vpc", tmp_files("one.vhd", vhd), "-F", "raw", tmp_files("one.raw", bytes(disk))],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert check_seekable(io.BytesIO(stored)) == len(vhd)


def test_zstd_decompresses_a_one_pass_backup(kit, tmp_path, require_tool):
    zstd = require_tool("zstd")
    disk = disk_image(kit, 8 * MIB, zero_blocks=(1, 3))
    stored, _, _ = one_pass(tmp_path, disk, "full")
    result = subprocess.run([zstd, "-d", "-c", "-q"], input=stored, capture_output=True, check=True)
    assert result.stdout == open_seekable(io.BytesIO(stored)).read()


def test_a_one_pass_incremental_stacks_on_its_parent(kit, tmp_path):
    old = disk_image(kit, 9 * MIB + 4096, zero_blocks=(2,))
    base, _, _ = one_pass(tmp_path, old, "base")
    base_info = VHDReader(open_seekable(io.BytesIO(base))).info
    new = kit.change_pages(old, seed=4, count=6)
    new[2 * BLOCK + 8192 : 2 * BLOCK + 12288] = b"x" * 4096  # a page in the block that was all zeros
    inc, scan, read = one_pass(tmp_path, new, "inc", parent=base_info.as_parent("base.vhd"),
                               old_map=tmp_path / "base.map")  # fmt: skip
    assert read == len(new)
    assert 4096 <= scan.changed_bytes <= 7 * 4096
    info = validate(open_seekable(io.BytesIO(inc)), expected_kind="incremental", parent_unique_id=base_info.unique_id)
    assert info.allocated_blocks == scan.stored_blocks
    chain = open_chain([open_seekable(io.BytesIO(base)), open_seekable(io.BytesIO(inc))])
    kit.same(chain.read(0, len(new)), new)


def test_the_stream_is_the_same_for_the_same_disk(kit, tmp_path):
    """A resumed upload regenerates the stream: it must be byte-identical, whatever the threads did."""
    disk = disk_image(kit, 9 * MIB, zero_blocks=(1,))
    image = tmp_path / "d.img"
    image.write_bytes(bytes(disk))
    blobs = []
    for n in range(2):
        out = io.BytesIO()
        with Source(str(image)) as src:
            pack(src, out, tmp_path / f"{n}.map", page_size=4096, unique_id=uuid.UUID(int=7), timestamp=5)
        blobs.append(out.getvalue())
    assert blobs[0] == blobs[1]
