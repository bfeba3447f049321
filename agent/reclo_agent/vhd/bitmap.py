"""Sector bitmaps: one bit per 512-byte sector of a block, MSB first.

Sector ``i`` of a block is bit ``0x80 >> (i % 8)`` of byte ``i // 8``. A set
bit means "this sector's data is in this file"; in a differencing VHD a clear
bit means "read it from the parent". Bitmaps are handled as runs of sectors
(start, count) because the agent tracks changes per page (4-64 KiB), so runs
are long and few, and Python loops per sector would be far too slow.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

Run = tuple[int, int]  # (first sector, number of sectors)

# Whole bytes of set bits, or one byte that is partly set.
_SET_BYTES = re.compile(rb"\xff+|[^\x00\xff]")
_INVERT = bytes(255 - i for i in range(256))


def set_runs(bitmap: bytes, nbits: int) -> list[Run]:
    """Runs of set bits among the first ``nbits`` bits of ``bitmap``."""
    runs: list[Run] = []

    def add(start: int, count: int) -> None:
        if runs and sum(runs[-1]) == start:
            runs[-1] = (runs[-1][0], runs[-1][1] + count)
        else:
            runs.append((start, count))

    for m in _SET_BYTES.finditer(bitmap, 0, -(-nbits // 8)):
        first = m.start()
        if bitmap[first] == 0xFF:
            add(first * 8, (m.end() - first) * 8)
        else:
            byte = bitmap[first]
            for bit in range(8):
                if byte & (0x80 >> bit):
                    add(first * 8 + bit, 1)
    # The last byte may hold bits past nbits: cut the runs there.
    clipped = []
    for start, count in runs:
        if start < nbits:
            clipped.append((start, min(count, nbits - start)))
    return clipped


def clear_runs(bitmap: bytes, nbits: int) -> list[Run]:
    """Runs of clear bits among the first ``nbits`` bits of ``bitmap``."""
    return set_runs(bitmap[: -(-nbits // 8)].translate(_INVERT), nbits)


def make_bitmap(runs: Iterable[Run], size: int) -> bytes:
    """A ``size``-byte bitmap with the sectors of ``runs`` set."""
    bm = bytearray(size)
    for start, count in runs:
        end = start + count
        if start < 0 or count < 0 or end > size * 8:
            raise ValueError(f"sector run ({start}, {count}) outside a {size}-byte bitmap")
        while start < end and start % 8:
            bm[start // 8] |= 0x80 >> (start % 8)
            start += 1
        whole_end = end - end % 8
        if start < whole_end:
            bm[start // 8 : whole_end // 8] = b"\xff" * ((whole_end - start) // 8)
            start = whole_end
        while start < end:
            bm[start // 8] |= 0x80 >> (start % 8)
            start += 1
    return bytes(bm)


def full_bitmap(nbits: int, size: int) -> bytes:
    """A ``size``-byte bitmap with the first ``nbits`` bits set."""
    return make_bitmap([(0, nbits)], size)


def to_int(bitmap: bytes, nbits: int) -> int:
    """The first ``nbits`` bits as an integer whose top bit is sector 0.

    Integers make the set algebra of a chain (which sectors are still needed
    from a lower layer) a few big-integer operations per block.
    """
    nbytes = -(-nbits // 8)
    return int.from_bytes(bitmap[:nbytes], "big") >> (nbytes * 8 - nbits)


def from_int(bits: int, nbits: int, size: int) -> bytes:
    """Inverse of :func:`to_int`, padded with clear bits to ``size`` bytes."""
    nbytes = -(-nbits // 8)
    return (bits << (nbytes * 8 - nbits)).to_bytes(nbytes, "big").ljust(size, b"\0")
