"""Reading VHDs (fixed, dynamic, differencing) and differencing chains.

:class:`VHDReader` opens one VHD from a seekable binary file object (a local
file, or the decompressed view of a stored object from
:func:`~reclo_agent.vhd.seekzstd.open_seekable`). Opening it checks the
whole structure, because the files come from customers' machines: every
size, offset and count read from the file is bounded by the file's size
before anything is allocated or looped over, and any inconsistency raises
:class:`~reclo_agent.vhd.errors.VHDError`.

Memory stays bounded whatever the header declares: the BAT (4 bytes per
declared block, 2 GiB for a 2 TiB disk of 4 KiB blocks, yet a few kilobytes
compressed) is only ever read in windows of ``BAT_WINDOW`` entries, and runs
of unallocated entries are skipped by comparing bytes, so the work per
declared block that holds nothing is a C-level byte comparison and Python
work grows with the allocated blocks only. Blocks must be stored in block
order (as ReClo's writer and qemu-img lay them out): that is what lets the
overlap check stream instead of sorting every entry.

:class:`ChainReader` stacks a base (dynamic or fixed) and differencing
layers: a sector comes from the topmost layer whose block bitmap has it.
"""

from __future__ import annotations

import heapq
import sys
from array import array
from collections.abc import Iterable, Iterator, Sequence
from itertools import groupby, pairwise

from . import bitmap
from .errors import VHDError
from .format import (
    DEFAULT_BLOCK_SIZE,
    DISK_TYPE_NAMES,
    FOOTER_SIZE,
    HEADER_SIZE,
    MAX_BLOCK_SIZE,
    MAX_VIRTUAL_SIZE,
    MIN_BLOCK_SIZE,
    NO_OFFSET,
    PLATFORM_NONE,
    SECTOR,
    UNALLOCATED,
    DiskType,
    DynamicHeader,
    Footer,
    VHDInfo,
    bitmap_size,
)
from .streams import Readable, read_fully

# BAT entries read at once: 256 KiB of BAT, 32 GiB of disk at 2 MiB blocks.
BAT_WINDOW = 64 * 1024
# Unallocated runs are found this many entries at a time (4 KiB of BAT).
_BAT_RUN = 1024
_UNALLOCATED_RUN = b"\xff" * (4 * _BAT_RUN)
_UNALLOCATED_WINDOW = b"\xff" * (4 * BAT_WINDOW)  # compared with memcmp, far faster than counting


def read_at(f: Readable, offset: int, n: int, what: str) -> bytes:
    """Exactly ``n`` bytes at ``offset`` (looping over short reads)."""
    f.seek(offset)
    data = read_fully(f, n)
    if len(data) != n:
        raise VHDError(f"file truncated: {what} at offset {offset} is cut short")
    return data


class VHDReader:
    """One VHD file, structure checked on opening.

    ``read()`` gives this layer alone (for a differencing VHD, sectors it
    does not hold read as zeros); use :class:`ChainReader` for the disk a
    chain describes. ``read_bitmap()`` and ``read_block_data()`` give a
    block's raw parts.
    """

    def __init__(self, f: Readable, *, max_blocks: int | None = None) -> None:
        """Open and check ``f``; ``max_blocks`` refuses a header declaring more blocks.

        The limit is checked from the header alone, before the BAT is read:
        a caller that must bound its work per stored byte (the portal's
        verifier) refuses absurd declarations that way.
        """
        self._f = f
        self._max_blocks = max_blocks
        self._window: tuple[int, array] | None = None
        self.file_size = f.seek(0, 2)
        if self.file_size < FOOTER_SIZE:
            raise VHDError(f"file too small to be a VHD ({self.file_size} bytes)")
        raw_footer = read_at(f, self.file_size - FOOTER_SIZE, FOOTER_SIZE, "footer")
        self.footer = footer = Footer.unpack(raw_footer)
        if footer.disk_type not in DISK_TYPE_NAMES:
            raise VHDError(f"unsupported disk type {footer.disk_type} (not fixed, dynamic or differencing)")
        self.disk_type = DiskType(footer.disk_type)
        size = self.virtual_size = footer.current_size
        if size == 0 or size % SECTOR or size > MAX_VIRTUAL_SIZE:
            raise VHDError(f"virtual size {size} is not a positive multiple of {SECTOR} up to {MAX_VIRTUAL_SIZE}")
        self.header: DynamicHeader | None = None
        if self.disk_type == DiskType.FIXED:
            self._open_fixed()
        else:
            self._open_dynamic(raw_footer)
        self.block_count = -(-size // self.block_size)
        self._sectors_per_block = self.block_size // SECTOR
        self._full_bitmap = bitmap.full_bitmap(self._sectors_per_block, self._bitmap_size)
        header = self.header
        differencing = header is not None and self.disk_type == DiskType.DIFFERENCING
        self.info = VHDInfo(
            disk_type=DISK_TYPE_NAMES[self.disk_type],
            unique_id=footer.unique_id,
            virtual_size=size,
            block_size=header.block_size if header else None,
            allocated_blocks=self.allocated_count,
            timestamp=footer.timestamp,
            file_size=self.file_size,
            parent_unique_id=header.parent_unique_id if header is not None and differencing else None,
            parent_timestamp=header.parent_timestamp if header is not None and differencing else None,
            parent_name=header.parent_name if header is not None and differencing else None,
        )

    def _open_fixed(self) -> None:
        if self.footer.data_offset != NO_OFFSET:
            raise VHDError(f"fixed VHD has a data offset ({self.footer.data_offset:#x}); expected none")
        if self.file_size != self.virtual_size + FOOTER_SIZE:
            raise VHDError(
                f"fixed VHD file is {self.file_size} bytes; its virtual size "
                f"{self.virtual_size} needs {self.virtual_size + FOOTER_SIZE}"
            )
        # A fixed disk is read in blocks of the usual size, all present.
        self.block_size = DEFAULT_BLOCK_SIZE
        self._bitmap_size = bitmap_size(self.block_size)
        self._fixed = True
        self.allocated_count = -(-self.virtual_size // self.block_size)

    def _open_dynamic(self, raw_footer: bytes) -> None:
        f, file_size, footer = self._f, self.file_size, self.footer
        end = file_size - FOOTER_SIZE  # where the data area ends
        if footer.data_offset != FOOTER_SIZE:
            raise VHDError(f"dynamic header offset is {footer.data_offset:#x}; expected {FOOTER_SIZE:#x}")
        if end < FOOTER_SIZE + HEADER_SIZE:
            raise VHDError(f"file too small for a dynamic VHD ({file_size} bytes)")
        if read_at(f, 0, FOOTER_SIZE, "footer copy") != raw_footer:
            raise VHDError("the footer copy at the start differs from the footer at the end")
        self.header = header = DynamicHeader.unpack(read_at(f, FOOTER_SIZE, HEADER_SIZE, "dynamic header"))

        block_size = header.block_size
        if block_size & (block_size - 1) or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
            raise VHDError(
                f"block size {block_size} is not a power of two between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}"
            )
        self.block_size = block_size
        self._bitmap_size = bitmap_size(block_size)
        blocks = -(-self.virtual_size // block_size)
        if self._max_blocks is not None and blocks > self._max_blocks:
            raise VHDError(
                f"the header declares {blocks} blocks of {block_size} bytes: more than the "
                f"{self._max_blocks} allowed (use larger blocks)"
            )
        if header.max_table_entries < blocks:
            raise VHDError(f"BAT has {header.max_table_entries} entries but the disk has {blocks} blocks")
        # Bound the BAT by the file before reading it: only then allocate.
        bat_end = header.table_offset + 4 * header.max_table_entries
        if bat_end > end:
            raise VHDError(
                f"BAT ({header.max_table_entries} entries at offset {header.table_offset}) "
                f"does not fit in the {file_size}-byte file"
            )
        self._fixed = False
        self._table_offset = header.table_offset
        self._bat_entries = blocks

        # Everything in the file must be inside it and must not overlap.
        regions = [
            (0, FOOTER_SIZE, "footer copy"),
            (FOOTER_SIZE, FOOTER_SIZE + HEADER_SIZE, "dynamic header"),
            (header.table_offset, bat_end, "BAT"),
        ]
        if self.disk_type == DiskType.DIFFERENCING:
            for n, loc in enumerate(header.locators):
                if loc.code == PLATFORM_NONE:
                    continue
                loc_end = loc.data_offset + loc.data_length
                if loc_end > end:
                    raise VHDError(f"parent locator {n} ({loc.code!r}) points outside the file")
                regions.append((loc.data_offset, loc_end, f"parent locator {n}"))
        regions.sort()
        for (_, a_end, a), (b_start, _, b) in pairwise(regions):
            if b_start < a_end:
                raise VHDError(f"{a} and {b} overlap")
        self._check_blocks(regions, end)

    def _check_blocks(self, regions: list[tuple[int, int, str]], end: int) -> None:
        """One pass over the BAT: every block inside the data area, in order, overlapping nothing.

        Blocks (bitmap + data, at sector offsets) all have the same length,
        so in block order each must start at least one block after the one
        before. Regions are sorted and blocks increase, so one pointer walks
        the regions alongside.
        """
        stride = self._bitmap_size + self.block_size
        count = 0
        prev_index, prev_start = -1, -1
        region = 0
        for index, entry in self._allocated_entries():
            start = entry * SECTOR
            if start + stride > end:
                raise VHDError(f"BAT entry for block {index} points outside the file")
            if prev_index >= 0:
                if start < prev_start:
                    raise VHDError(
                        f"block {index} is stored before block {prev_index}: blocks must be stored in block order"
                    )
                if start < prev_start + stride:
                    raise VHDError(f"blocks {prev_index} and {index} overlap")
            while region < len(regions) and regions[region][1] <= start:
                region += 1
            for r_start, _r_end, what in regions[region:]:
                if r_start >= start + stride:
                    break
                raise VHDError(f"block {index} overlaps the {what}")
            prev_index, prev_start = index, start
            count += 1
        self.allocated_count = count

    # --- the BAT, in windows ---------------------------------------------------------

    def _bat_window(self, first: int) -> array:
        """BAT entries [first, first + BAT_WINDOW) (fewer at the end), host order."""
        n = min(BAT_WINDOW, self._bat_entries - first)
        window = array("I")
        window.frombytes(read_at(self._f, self._table_offset + 4 * first, 4 * n, "BAT"))
        if sys.byteorder == "little":
            window.byteswap()
        return window

    def bat_entry(self, index: int) -> int:
        """The BAT entry of block ``index`` (its sector in the file, or UNALLOCATED)."""
        if self._fixed:
            return index * self.block_size // SECTOR
        first = index - index % BAT_WINDOW
        if self._window is None or self._window[0] != first:
            self._window = (first, self._bat_window(first))
        return self._window[1][index - first]

    def _allocated_entries(self) -> Iterator[tuple[int, int]]:
        """``(index, entry)`` of every allocated block, in block order, a window at a time."""
        if self._fixed:
            for index in range(self.block_count):
                yield index, index * self.block_size // SECTOR
            return
        for first in range(0, self._bat_entries, BAT_WINDOW):
            n = min(BAT_WINDOW, self._bat_entries - first)
            raw = read_at(self._f, self._table_offset + 4 * first, 4 * n, "BAT")
            if raw == (_UNALLOCATED_WINDOW if n == BAT_WINDOW else _UNALLOCATED_WINDOW[: 4 * n]):
                continue  # all unallocated: the common case of a sparse disk
            window = array("I")
            window.frombytes(raw)
            if sys.byteorder == "little":
                window.byteswap()
            for run in range(0, n, _BAT_RUN):
                if raw[4 * run : 4 * (run + _BAT_RUN)] == _UNALLOCATED_RUN[: 4 * min(_BAT_RUN, n - run)]:
                    continue
                for i in range(run, min(run + _BAT_RUN, n)):
                    entry = window[i]
                    if entry != UNALLOCATED:
                        yield first + i, entry

    def allocated_indices(self) -> Iterator[int]:
        """Indices of the blocks this file stores, in increasing order."""
        for index, _ in self._allocated_entries():
            yield index

    @property
    def size(self) -> int:
        return self.virtual_size

    @property
    def bitmap_size(self) -> int:
        """Bytes of a stored block's sector bitmap (before its data)."""
        return self._bitmap_size

    def block_length(self, index: int) -> int:
        """Bytes of block ``index`` inside the virtual disk (the last may be short)."""
        return min(self.block_size, self.virtual_size - index * self.block_size)

    def is_allocated(self, index: int) -> bool:
        return self._fixed or self.bat_entry(index) != UNALLOCATED

    def read_bitmap(self, index: int) -> bytes | None:
        """The sector bitmap of block ``index``, or None if it is not in the file."""
        if self._fixed:
            return self._full_bitmap
        entry = self.bat_entry(index)
        if entry == UNALLOCATED:
            return None
        return read_at(self._f, entry * SECTOR, self._bitmap_size, f"bitmap of block {index}")

    def read_block_data(self, index: int) -> bytes:
        """The stored bytes of block ``index`` (``block_size``; zeros if absent).

        Sectors that the bitmap does not mark are returned as stored; callers
        that care use the bitmap (as :class:`ChainReader` does).
        """
        if self._fixed:
            n = self.block_length(index)
            data = read_at(self._f, index * self.block_size, n, f"block {index}")
            return data.ljust(self.block_size, b"\0")
        entry = self.bat_entry(index)
        if entry == UNALLOCATED:
            return bytes(self.block_size)
        offset = entry * SECTOR + self._bitmap_size
        return read_at(self._f, offset, self.block_size, f"block {index}")

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of this layer alone at ``offset`` of the virtual disk."""
        return ChainReader([self], _check=False).read(offset, length)


def stack_block(layers: Iterable, block_size: int, length: int) -> bytes | memoryview:
    """One block of a chain from its layers' stored blocks: ``(bitmap, data)``, top layer first.

    ``data`` may be a callable returning the data (read only when the layer
    has a sector still needed). A sector comes from the topmost layer whose
    bitmap has it; sectors no layer has are zeros. Returns ``length`` bytes
    (a memoryview when one layer's data, given as a memoryview, holds them all).
    """
    nsect_block = block_size // SECTOR
    nsect = length // SECTOR
    # Sectors still needed, as an integer whose top bit is sector 0.
    need = ((1 << nsect) - 1) << (nsect_block - nsect)
    out: bytes | bytearray | memoryview | None = None
    for layer_bitmap, data in layers:
        have = bitmap.to_int(layer_bitmap, nsect_block)
        take = need & have
        if take:
            if callable(data):
                data = data()
            if out is None and take == need:
                out = data  # the whole block from one layer: no copying
            else:
                # (A whole block taken from one layer above ends the loop, so out is None here.)
                if not isinstance(out, bytearray):
                    out = bytearray(block_size)
                take_map = bitmap.from_int(take, nsect_block, -(-nsect_block // 8))
                for start, count in bitmap.set_runs(take_map, nsect_block):
                    lo, hi = start * SECTOR, (start + count) * SECTOR
                    out[lo:hi] = data[lo:hi]
        need &= ~have
        if not need:
            break
    if out is None:
        return bytes(length)
    if isinstance(out, memoryview):  # a view of a layer's decompressed frame (the restore's): kept a view
        return out if len(out) == length else out[:length]
    return out[:length] if isinstance(out, bytes) and len(out) == length else bytes(out[:length])


class ChainReader:
    """The virtual disk of a chain: ``[base, incremental1, incremental2, ...]``.

    The base is a dynamic (or fixed) VHD; each layer above is a differencing
    VHD whose parent unique id is the unique id of the layer below, with the
    same virtual size and block size (anything else raises VHDError).
    """

    def __init__(self, layers: Sequence[VHDReader], *, _check: bool = True) -> None:
        if not layers:
            raise ValueError("a chain needs at least one VHD")
        self.layers = list(layers)
        top = self.layers[-1]
        if _check:
            self._check_links()
        self.virtual_size = top.virtual_size
        self.block_size = top.block_size
        self.block_count = top.block_count
        self._nsect = self.block_size // SECTOR
        self._cache: tuple[int, bytes] | None = None

    def _check_links(self) -> None:
        base = self.layers[0]
        if base.disk_type == DiskType.DIFFERENCING:
            raise VHDError("the base of a chain must be a full (dynamic or fixed) VHD, not a differencing one")
        for n, (below, layer) in enumerate(pairwise(self.layers), start=1):
            if layer.disk_type != DiskType.DIFFERENCING:
                raise VHDError(f"layer {n} of the chain is a {layer.info.disk_type} VHD, not a differencing one")
            if layer.info.parent_unique_id != below.info.unique_id:
                raise VHDError(
                    f"layer {n}'s parent id {layer.info.parent_unique_id} is not the id "
                    f"{below.info.unique_id} of the layer below"
                )
            if layer.virtual_size != below.virtual_size:
                raise VHDError(f"layer {n} is {layer.virtual_size} bytes, its parent {below.virtual_size}")
            if layer.block_size != below.block_size:
                raise VHDError(f"layer {n} has {layer.block_size}-byte blocks, its parent {below.block_size}")

    @property
    def size(self) -> int:
        return self.virtual_size

    @property
    def top(self) -> VHDReader:
        return self.layers[-1]

    def allocated_blocks(self) -> Iterator[int]:
        """Indices of blocks stored in some layer, in increasing order.

        Every other block reads as zeros; this costs no data reads. Each
        layer's BAT is walked in windows and the walks merged, so the work
        grows with the allocated blocks, not the declared ones. A fresh
        iterator per call (the merger walks twice).
        """
        merged = heapq.merge(*(layer.allocated_indices() for layer in self.layers))
        for index, _ in groupby(merged):
            yield index

    def read_block(self, index: int) -> bytes:
        """Block ``index`` of the virtual disk (the last one may be short)."""
        if self._cache and self._cache[0] == index:
            return self._cache[1]

        def stored():  # top layer first; each layer's data read only if needed
            for layer in reversed(self.layers):
                layer_bitmap = layer.read_bitmap(index)
                if layer_bitmap is not None:
                    yield layer_bitmap, lambda layer=layer: layer.read_block_data(index)

        block = stack_block(stored(), self.block_size, self.layers[-1].block_length(index))
        if isinstance(block, memoryview):  # (not from these layers' bytes; for the type)
            block = bytes(block)
        self._cache = (index, block)
        return block

    def iter_blocks(self) -> Iterator[tuple[int, bytes]]:
        """``(index, data)`` of every block stored in some layer, in order.

        Blocks no layer stores are all zeros and are skipped without any
        read; restoring to a target that is not known to be zeroed must write
        zeros there itself.
        """
        for index in self.allocated_blocks():
            yield index, self.read_block(index)

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of the virtual disk (short at its end)."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        end = min(offset + length, self.virtual_size)
        parts = []
        while offset < end:
            index, within = divmod(offset, self.block_size)
            block = self.read_block(index)
            part = block[within : within + end - offset]
            parts.append(part)
            offset += len(part)
        return b"".join(parts)


def open_chain(files: Sequence[Readable]) -> ChainReader:
    """A :class:`ChainReader` over file objects, base first."""
    return ChainReader([VHDReader(f) for f in files])
