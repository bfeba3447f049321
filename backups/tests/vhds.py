"""Real restore points made with the agent package's writers (no hand-made fakes)."""

import io
import random
import uuid

from reclo_agent import vhd
from reclo_agent.vhd.format import FOOTER_SIZE, HEADER_SIZE, SECTOR, DiskType, DynamicHeader, Footer, bitmap_size

BLOCK = vhd.DEFAULT_BLOCK_SIZE
DISK_SIZE = 3 * BLOCK  # three 2 MiB blocks: small, yet a real multi-block disk


def _page(rng: random.Random) -> bytes:
    # Distinct per page but compressible, so test objects stay small.
    return rng.randbytes(16) * 256


def raw_disk(seed: int = 1, size: int = DISK_SIZE) -> bytearray:
    """A disk image of distinct 4 KiB pages, the middle block all zeros (unallocated in a VHD)."""
    rng = random.Random(seed)
    data = bytearray(b"".join(_page(rng) for _ in range(size // 4096)))
    data[BLOCK : 2 * BLOCK] = bytes(BLOCK)
    return data


def changed(raw: bytes, seed: int, writes: int = 5) -> bytearray:
    """A copy of `raw` with a few scattered 4 KiB writes (the next restore point's disk)."""
    rng = random.Random(seed)
    new = bytearray(raw)
    for _ in range(writes):
        at = rng.randrange(0, len(raw) // 4096) * 4096
        new[at : at + 4096] = _page(rng)
    return new


def full(raw: bytes, **kwargs) -> tuple[bytes, vhd.VHDInfo]:
    """A full restore point of `raw`: a dynamic VHD as seekable zstd."""
    out = io.BytesIO()
    with vhd.SeekableZstdWriter(out) as writer:
        info = vhd.write_dynamic_from_raw(io.BytesIO(bytes(raw)), writer, **kwargs)
    return out.getvalue(), info


def incremental(old: bytes, new: bytes, parent: vhd.VHDInfo, *, parent_name: str = "parent.vhd", **kwargs):
    """An incremental restore point: a differencing VHD holding the sectors that changed."""
    out = io.BytesIO()
    sectors_per_block = BLOCK // SECTOR
    blocks = {}
    for index in range(-(-len(new) // BLOCK)):
        lo = index * BLOCK
        runs, start = [], None
        for sector in range(sectors_per_block + 1):
            a = lo + sector * SECTOR
            differs = sector < sectors_per_block and old[a : a + SECTOR] != new[a : a + SECTOR]
            if differs and start is None:
                start = sector
            elif not differs and start is not None:
                runs.append((start, sector - start))
                start = None
        if runs:
            blocks[index] = vhd.make_bitmap(runs, bitmap_size(BLOCK))
    with vhd.SeekableZstdWriter(out) as writer:
        w = vhd.VHDWriter(writer, len(new), blocks, parent=parent.as_parent(parent_name), **kwargs)
        for index, bitmap in sorted(blocks.items()):
            w.write_block(index, bytes(new[index * BLOCK : (index + 1) * BLOCK]), bitmap)
        info = w.close()
    return out.getvalue(), info


def restored(objects: list[bytes]) -> bytes:
    """The disk a chain of stored restore points describes, read by the agent's chain reader."""
    chain = vhd.open_chain([vhd.open_seekable(io.BytesIO(o)) for o in objects])
    return chain.read(0, chain.virtual_size)


def crafted_empty(virtual_size: int, block_size: int) -> bytes:
    """A valid but empty dynamic VHD as seekable zstd: a header and a BAT of "unallocated".

    What an attacker uploads to make the verifier read a huge BAT: 128 GiB of
    4 KiB blocks is a 128 MiB BAT in about 6 KB.
    """
    blocks = -(-virtual_size // block_size)
    footer = Footer(
        disk_type=DiskType.DYNAMIC, current_size=virtual_size, unique_id=uuid.uuid4(), timestamp=0,
        data_offset=FOOTER_SIZE,
    ).pack()  # fmt: skip
    header = DynamicHeader(table_offset=FOOTER_SIZE + HEADER_SIZE, max_table_entries=blocks, block_size=block_size)
    out = io.BytesIO()
    with vhd.SeekableZstdWriter(out, max_frame_size=1 << 20) as writer:
        writer.write(footer + header.pack())
        left = -(-4 * blocks // SECTOR) * SECTOR
        while left:
            writer.write(b"\xff" * min(left, 1 << 20))
            left -= min(left, 1 << 20)
        writer.write(footer)
    return out.getvalue()
