"""Seekable zstd storage: round trips, one frame per block, zstd CLI, corruption."""

import hashlib
import io
import subprocess
import uuid

import pytest
import pyzstd
from hypothesis import given, settings
from hypothesis import strategies as st
from reclo_agent.vhd import (
    SeekableZstdWriter,
    VHDError,
    VHDReader,
    VHDWriter,
    check_seekable,
    compress_seekable,
    decompress_frame,
    merge_chain,
    open_chain,
    open_seekable,
    read_seek_table,
    validate,
    validate_stored,
    write_dynamic_from_raw,
)

MIB = 1024 * 1024
SIZE = 7 * MIB + 512 * 3


class Pipe(io.RawIOBase):
    """A non-seekable output that takes at most 1000 bytes per write."""

    def __init__(self):
        self.buf = bytearray()

    def writable(self):
        return True

    def write(self, b):
        n = min(len(b), 1000)
        self.buf += bytes(b[:n])
        return n


def frames(stored: bytes):
    with pyzstd.SeekableZstdFile(io.BytesIO(stored)) as f:
        return f.seek_table_info[0]


def test_vhd_streams_into_one_frame_per_block(kit):
    disk = kit.make_disk(SIZE, seed=3)
    pipe = Pipe()
    with SeekableZstdWriter(pipe) as stored:
        info = write_dynamic_from_raw(io.BytesIO(bytes(disk)), stored)
    blob = bytes(pipe.buf)
    assert stored.compressed_size == len(blob)
    assert stored.sha256() == hashlib.sha256(blob).hexdigest()
    # The metadata, each allocated block, the footer.
    assert frames(blob) == 1 + info.allocated_blocks + 1
    assert check_seekable(io.BytesIO(blob)) == info.file_size
    vhd = open_seekable(io.BytesIO(blob))
    assert validate(vhd, expected_kind="full", virtual_size=SIZE) == info
    kit.same(VHDReader(vhd).read(0, SIZE), disk)


def test_compress_seekable_round_trip(kit):
    vhd = kit.dynamic_vhd(kit.make_disk(SIZE, seed=4))
    dst = Pipe()
    stored = compress_seekable(io.BytesIO(vhd), dst)
    blob = bytes(dst.buf)
    assert stored.size == len(blob)
    assert stored.sha256 == hashlib.sha256(blob).hexdigest()
    assert frames(blob) == -(-len(vhd) // (2 * MIB))
    f = open_seekable(io.BytesIO(blob))
    kit.same(f.read(), vhd)
    f.seek(len(vhd) - 512)
    assert f.read(512) == vhd[-512:]
    f.seek(3 * MIB + 17)
    assert f.read(100) == vhd[3 * MIB + 17 : 3 * MIB + 117]


def test_zstd_cli_decompresses_stored_objects(kit, require_tool):
    zstd = require_tool("zstd")
    disk = kit.make_disk(SIZE, seed=5)
    same = {"unique_id": uuid.uuid4(), "timestamp": 1000}
    vhd = kit.dynamic_vhd(disk, **same)
    out = io.BytesIO()
    compress_seekable(io.BytesIO(vhd), out)
    result = subprocess.run([zstd, "-d", "-c", "-q"], input=out.getvalue(), capture_output=True, check=True)
    kit.same(result.stdout, vhd)
    # Also a VHD written block by block (a frame each) through a non-seekable pipe.
    pipe = Pipe()
    with SeekableZstdWriter(pipe) as stored:
        write_dynamic_from_raw(io.BytesIO(bytes(disk)), stored, **same)
    result = subprocess.run([zstd, "-d", "-c", "-q"], input=bytes(pipe.buf), capture_output=True, check=True)
    kit.same(result.stdout, vhd)


def test_chain_reads_and_merges_from_stored_objects(kit):
    """The restore and consolidation path: every layer read through zstd."""
    base_disk = kit.make_disk(SIZE, seed=6)
    new = kit.change_pages(base_disk, seed=7, count=30)
    base_vhd = kit.dynamic_vhd(base_disk)
    parent = VHDReader(io.BytesIO(base_vhd)).info.as_parent("base.vhd")
    inc_vhd = kit.differencing_vhd(base_disk, new, parent)
    blobs = []
    for vhd in (base_vhd, inc_vhd):
        out = io.BytesIO()
        compress_seekable(io.BytesIO(vhd), out)
        blobs.append(out.getvalue())
    chain = open_chain([open_seekable(io.BytesIO(b)) for b in blobs])
    kit.same(chain.read(0, SIZE), new)
    merged = io.BytesIO()
    with SeekableZstdWriter(merged) as stored:
        merge_chain(chain, stored)
    kit.same(VHDReader(open_seekable(io.BytesIO(merged.getvalue()))).read(0, SIZE), new)


def test_empty_writer_is_a_valid_empty_stream():
    out = io.BytesIO()
    SeekableZstdWriter(out).close()
    assert check_seekable(io.BytesIO(out.getvalue())) == 0


def test_corrupt_streams_raise_vhderror(kit):
    vhd = kit.dynamic_vhd(kit.make_disk(SIZE, seed=8))
    out = io.BytesIO()
    compress_seekable(io.BytesIO(vhd), out)
    blob = out.getvalue()
    with pytest.raises(VHDError, match="seek table|Seekable"):
        open_seekable(io.BytesIO(b"not zstd at all, just some bytes"))
    with pytest.raises(VHDError, match="seek table"):
        check_seekable(io.BytesIO(blob[:-1]))
    with pytest.raises(VHDError, match="no seek table"):
        check_seekable(io.BytesIO(vhd))
    # A flipped byte inside the first frame: caught by the frame checksum.
    bad = blob[:100] + bytes([blob[100] ^ 0xFF]) + blob[101:]
    with pytest.raises(VHDError):
        check_seekable(io.BytesIO(bad))
    with pytest.raises(VHDError):
        validate(open_seekable(io.BytesIO(bad)))
    # A frame cut short (the seek table then no longer adds up).
    with pytest.raises(VHDError):
        check_seekable(io.BytesIO(blob[:50] + blob[60:]))


def _small_stored():
    disk = (bytes(range(256)) * 40)[:8192] + bytes(4096) + b"tail" * 256
    vhd = io.BytesIO()
    info = write_dynamic_from_raw(io.BytesIO(disk), vhd, block_size=4096)
    out = io.BytesIO()
    with SeekableZstdWriter(out) as stored:
        w = VHDWriter(stored, len(disk), [0, 2], parent=info.as_parent("p.vhd"), block_size=4096)
        w.write_block(0, disk[:4096], b"\xf0")
        w.write_block(2, disk[8192:12288])
        w.close()
    return out.getvalue()


STORED = _small_stored()


@settings(max_examples=300, deadline=None, database=None)
@given(
    st.lists(st.tuples(st.integers(0, len(STORED) - 1), st.integers(0, 255)), min_size=1, max_size=4),
    st.one_of(st.none(), st.integers(0, len(STORED))),
)
def test_fuzz_stored_objects_raise_only_vhderror(flips, cut):
    data = bytearray(STORED)
    for at, value in flips:
        data[at] = value
    if cut is not None:
        del data[cut:]
    try:
        check_seekable(io.BytesIO(bytes(data)))
    except VHDError:
        pass
    try:
        validate(open_seekable(io.BytesIO(bytes(data))))
    except VHDError:
        pass


def test_validate_stored_checks_frames_and_vhd(kit):
    disk = kit.make_disk(SIZE, seed=9)
    out = io.BytesIO()
    with SeekableZstdWriter(out) as stored:
        info = write_dynamic_from_raw(io.BytesIO(bytes(disk)), stored)
    blob = out.getvalue()
    assert validate_stored(io.BytesIO(blob), expected_kind="full", virtual_size=SIZE) == info
    with pytest.raises(VHDError, match="incremental backup must be"):
        validate_stored(io.BytesIO(blob), expected_kind="incremental")
    # Damage in a data frame is invisible to the VHD structure check alone.
    at = len(blob) // 2
    bad = blob[:at] + bytes([blob[at] ^ 0x55]) + blob[at + 1 :]
    validate(open_seekable(io.BytesIO(bad)))
    with pytest.raises(VHDError):
        validate_stored(io.BytesIO(bad))


def test_the_seek_table_locates_every_frame_and_each_decompresses_alone(kit):
    disk = kit.make_disk(SIZE, seed=9)
    out = io.BytesIO()
    with SeekableZstdWriter(out) as stored:
        write_dynamic_from_raw(io.BytesIO(disk), stored)
    blob = out.getvalue()
    table = read_seek_table(io.BytesIO(blob))
    frames = len(table.c_offsets) - 1
    assert frames == pyzstd.SeekableZstdFile(io.BytesIO(blob)).seek_table_info[0]
    parts = [
        decompress_frame(blob[table.c_offsets[i] : table.c_offsets[i + 1]], table.d_offsets[i + 1] - table.d_offsets[i])
        for i in range(frames)
    ]
    whole = b"".join(parts)
    assert whole == open_seekable(io.BytesIO(blob)).read()
    assert table.d_offsets[-1] == len(whole)
    for offset in (0, 511, 512, len(whole) // 2, len(whole) - 1):
        frame = table.frame_at(offset)
        assert table.d_offsets[frame] <= offset < table.d_offsets[frame + 1]
    with pytest.raises(VHDError):
        table.frame_at(len(whole))


def test_a_frame_that_does_not_match_its_seek_table_entry_raises_vhderror(kit):
    out = io.BytesIO()
    compress_seekable(io.BytesIO(kit.make_disk(3 * MIB, seed=10)), out, frame_size=MIB)
    blob = out.getvalue()
    table = read_seek_table(io.BytesIO(blob))
    frame = blob[table.c_offsets[0] : table.c_offsets[1]]
    size = table.d_offsets[1]
    assert decompress_frame(frame, size) == open_seekable(io.BytesIO(blob)).read(size)
    with pytest.raises(VHDError):
        decompress_frame(frame, size - 1)  # the frame holds more than the table says
    with pytest.raises(VHDError):
        decompress_frame(frame, size + 1)
    with pytest.raises(VHDError):
        decompress_frame(frame[:-5], size)  # cut short
    with pytest.raises(VHDError):
        decompress_frame(frame[:40] + bytes([frame[40] ^ 0xFF]) + frame[41:], size)  # its checksum
    with pytest.raises(VHDError):
        read_seek_table(io.BytesIO(blob[:-1]))
