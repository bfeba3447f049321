"""Real restore points made with the agent package's writers (no hand-made fakes)."""

import io
import random

from reclo_agent import vhd
from reclo_agent.vhd.format import SECTOR, bitmap_size

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
