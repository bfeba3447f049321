"""Streaming VHD writers: dynamic, differencing and fixed.

The agent compresses while it uploads, so a VHD is written front to back to
a non-seekable output, never patched afterwards. Two layouts of a dynamic
VHD, both plain VHDs any reader opens (the header's table offset says where
the BAT is):

- BAT first, when the allocated blocks are known up front (``allocated``
  given: merges, tests, :func:`write_dynamic_from_raw`)::

      footer copy | dynamic header | BAT | parent locators | blocks... | footer

  the n-th allocated block (in increasing block order) at a fixed place;
- BAT last (``allocated=None``: the agent's one pass, which decides each
  block as it reads it)::

      footer copy | dynamic header | parent locators | blocks... | zeros | BAT | footer

  The header comes first, so the BAT's offset must be known before any
  block is: it is where the data would end if every block were stored,
  and the room no block took is zeros (the writer's ``write_zeros``, when
  it has one: the seekable zstd writer stores a run of zeros in a few
  bytes). The BAT is kept in memory until the end: 4 bytes per block of
  the disk (2 MiB per TiB at 2 MiB blocks).

Memory stays bounded whatever the disk size: in the BAT-first layout the
BAT is generated and written a window at a time from the allocated
indices, never held as one list, plus one block.

If ``out`` has an ``end_frame()`` method (as
:class:`~reclo_agent.vhd.seekzstd.SeekableZstdWriter` does), it is called
after the metadata and after every block, so each VHD block becomes exactly
one zstd frame of the stored object and a ranged read reaches it directly.
:meth:`VHDWriter.block_payload` builds a block's bytes without touching the
writer, so pool threads can build and compress blocks
(:meth:`VHDWriter.add_compressed_block` then appends them in order).
"""

from __future__ import annotations

import sys
import uuid
from array import array
from collections.abc import Callable, Iterable, Iterator
from typing import Self

from . import bitmap
from .format import (
    DEFAULT_BLOCK_SIZE,
    FOOTER_SIZE,
    HEADER_SIZE,
    MAX_BLOCK_SIZE,
    MAX_VIRTUAL_SIZE,
    MIN_BLOCK_SIZE,
    NIL_UUID,
    NO_OFFSET,
    PLATFORM_W2KU,
    PLATFORM_W2RU,
    SECTOR,
    UNALLOCATED,
    DiskType,
    DynamicHeader,
    Footer,
    ParentInfo,
    ParentLocator,
    VHDInfo,
    bitmap_size,
    vhd_timestamp,
)
from .streams import Readable, Writable, read_fully


def _check_size(size: int) -> None:
    if not 0 < size <= MAX_VIRTUAL_SIZE or size % SECTOR:
        raise ValueError(
            f"disk size {size} must be a positive multiple of {SECTOR} and at most {MAX_VIRTUAL_SIZE} bytes"
        )


def _pad(n: int) -> int:
    """``n`` rounded up to a whole sector."""
    return -(-n // SECTOR) * SECTOR


class VHDWriter:
    """Writes a dynamic VHD, or a differencing one when ``parent`` is given.

    ``allocated=None`` writes the BAT-last layout (see the module doc):
    blocks come in increasing order, none announced. Otherwise
    ``allocated`` names every block index that :meth:`write_block` will be
    called for (any iterable, any order); the calls must then come in
    increasing block order. It is kept as a sorted array of those indices
    (4 bytes per allocated block); for disks whose allocated blocks are
    themselves many, pass instead a callable returning a fresh iterator of
    them in increasing order each call (e.g. ``ChainReader.allocated_blocks``)
    and memory stays constant (it is walked three times). :meth:`close` writes the final footer and returns
    the file's :class:`VHDInfo`. Used as a context manager it closes on
    success only, so a failed write never looks like a complete VHD.
    """

    def __init__(
        self,
        out: Writable,
        virtual_size: int,
        allocated: Iterable[int] | Callable[[], Iterator[int]] | None,
        *,
        parent: ParentInfo | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        unique_id: uuid.UUID | None = None,
        timestamp: int | None = None,
    ) -> None:
        _check_size(virtual_size)
        if block_size & (block_size - 1) or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
            raise ValueError(f"block size {block_size} is not a power of two in the sane range")
        self._out = out
        self._end_frame = getattr(out, "end_frame", None)
        self.virtual_size = virtual_size
        self.block_size = block_size
        self.block_count = -(-virtual_size // block_size)
        self._sectors_per_block = block_size // SECTOR
        self._bitmap_size = bitmap_size(block_size)
        self._full_bitmap = bitmap.full_bitmap(self._sectors_per_block, self._bitmap_size)
        self._footer = Footer(
            disk_type=DiskType.DIFFERENCING if parent else DiskType.DYNAMIC,
            current_size=virtual_size,
            unique_id=unique_id or uuid.uuid4(),
            timestamp=vhd_timestamp() if timestamp is None else timestamp,
            data_offset=FOOTER_SIZE,
        )
        self._parent = parent
        self._closed = False

        # The metadata, in file order.
        self._stride = (self._bitmap_size + block_size) // SECTOR
        self.allocated_count = 0
        self._streaming = allocated is None
        if self._streaming:
            locators, locator_data = self._locators(parent, FOOTER_SIZE + HEADER_SIZE)
            data_start = FOOTER_SIZE + HEADER_SIZE + len(locator_data)
            self._data_start = data_start // SECTOR
            # Where the data would end with every block stored.
            table_offset = data_start + self.block_count * self._stride * SECTOR
            self._bat_bytes = _pad(self.block_count * 4)
            sector = (table_offset + self._bat_bytes) // SECTOR
            self._bat = array("I", [UNALLOCATED]) * self.block_count
        else:
            table_offset = FOOTER_SIZE + HEADER_SIZE
            bat_bytes = _pad(self.block_count * 4)
            locators, locator_data = self._locators(parent, table_offset + bat_bytes)
            data_start = table_offset + bat_bytes + len(locator_data)
            # Which blocks come, in increasing order, as a fresh iterator per call.
            if callable(allocated):
                self._indices: Callable[[], Iterator[int]] = allocated
            elif allocated is not None:
                indices = array("I", sorted(set(allocated)))
                self._indices = lambda: iter(indices)
            self._data_start = data_start // SECTOR
            previous = -1
            for index in self._indices():
                if not 0 <= index < self.block_count:
                    raise ValueError(f"block {index} is outside a {self.block_count}-block disk")
                if index <= previous:
                    raise ValueError(f"allocated blocks must come in increasing order ({index} after {previous})")
                previous = index
                self.allocated_count += 1
            sector = self._data_start + self.allocated_count * self._stride
        if sector > UNALLOCATED:  # the final footer's sector must fit too
            raise ValueError("VHD would exceed the 2 TiB reachable by 32-bit BAT entries")
        self.file_size = sector * SECTOR + FOOTER_SIZE

        header = DynamicHeader(
            table_offset=table_offset,
            max_table_entries=self.block_count,
            block_size=block_size,
            parent_unique_id=parent.unique_id if parent else NIL_UUID,
            parent_timestamp=parent.timestamp if parent else 0,
            parent_name=parent.file_name if parent else "",
            locators=locators,
        )
        self._write(self._footer.pack())
        self._write(header.pack())
        if self._streaming:
            self._write(locator_data)
            self._last = -1
        else:
            self._write_bat(bat_bytes)
            self._write(locator_data)
            self._order = self._indices()
            self._next = next(self._order, None)
        if self._end_frame:
            self._end_frame()

    @staticmethod
    def _locators(parent: ParentInfo | None, offset: int) -> tuple[tuple[ParentLocator, ...], bytes]:
        """Parent locators and their data (each padded to a sector) at ``offset``.

        Windows resolves a parent through the absolute (W2ku) then the relative
        (W2ru) locator. We only know the parent's file name (restore points sit
        side by side), so W2ku holds the bare name and W2ru ``.\\name``.
        """
        if parent is None:
            return (), b""
        locators, data = [], b""
        for code, path in ((PLATFORM_W2KU, parent.file_name), (PLATFORM_W2RU, ".\\" + parent.file_name)):
            encoded = path.encode("utf-16-le")
            space = _pad(len(encoded))
            locators.append(ParentLocator(code, space, len(encoded), offset + len(data)))
            data += encoded.ljust(space, b"\0")
        return tuple(locators), data

    def _write(self, data: bytes) -> None:
        self._out.write(data)

    def _write_bat(self, bat_bytes: int) -> None:
        """The BAT, a window at a time: the n-th allocated block at data start + n strides."""
        window_entries = 64 * 1024
        sector = self._data_start
        pending = iter(self._indices())
        index = next(pending, None)
        for first in range(0, self.block_count, window_entries):
            n = min(window_entries, self.block_count - first)
            window = array("I", [UNALLOCATED]) * n
            while index is not None and index < first + n:
                window[index - first] = sector
                sector += self._stride
                index = next(pending, None)
            if sys.byteorder == "little":
                window.byteswap()  # the BAT is big-endian on disk
            self._write(window.tobytes())
        self._write(b"\xff" * (bat_bytes - 4 * self.block_count))

    def block_payload(self, index: int, data: bytes, sectors: bytes | None = None) -> bytes:
        """Block ``index`` as stored: its sector bitmap, then its data (see :meth:`write_block`).

        Changes nothing in the writer: safe to call from other threads.
        """
        in_disk = min(self.block_size, self.virtual_size - index * self.block_size)
        if len(data) not in (in_disk, self.block_size):
            raise ValueError(f"block {index} must be {in_disk} bytes, got {len(data)}")
        nsect = in_disk // SECTOR
        if sectors is None and nsect == self._sectors_per_block:
            block_bitmap = self._full_bitmap
        else:
            spb = self._sectors_per_block
            if sectors is None:
                present = -1
            elif len(sectors) * 8 < spb:
                raise ValueError(f"sector bitmap of block {index} has fewer than {spb} bits")
            else:
                present = bitmap.to_int(sectors, spb)
            # Sectors past the end of the disk are never present.
            present &= ((1 << nsect) - 1) << (spb - nsect)
            block_bitmap = bitmap.from_int(present, spb, self._bitmap_size)
        if block_bitmap is self._full_bitmap:
            return block_bitmap + data
        buf = bytearray(block_bitmap)
        buf += data
        buf += bytes(self.block_size - len(data))
        for start, count in bitmap.clear_runs(block_bitmap, self._sectors_per_block):
            at = self._bitmap_size + start * SECTOR
            buf[at : at + count * SECTOR] = bytes(count * SECTOR)
        return bytes(buf)

    def _place(self, index: int) -> None:
        """Check that block ``index`` comes now; in the BAT-last layout, give it the next place."""
        if self._closed:
            raise ValueError("write_block() on a closed VHDWriter")
        if self._streaming:
            if not self._last < index < self.block_count:
                raise ValueError(f"block {index} written out of order or outside the disk (after {self._last})")
            self._bat[index] = self._data_start + self.allocated_count * self._stride
            self.allocated_count += 1
            self._last = index
        elif index != self._next:
            raise ValueError(
                f"block {index} written out of order or not announced in `allocated` (expected block {self._next})"
            )

    def _placed(self) -> None:
        if not self._streaming:
            self._next = next(self._order, None)
        if self._end_frame:
            self._end_frame()

    def write_block(self, index: int, data: bytes, sectors: bytes | None = None) -> None:
        """Write block ``index``: ``data`` plus which sectors it holds.

        ``data`` is the block's bytes (``block_size``, or up to the end of the
        disk for the last block). ``sectors`` is a sector bitmap (see
        :mod:`.bitmap`; ``make_bitmap`` builds one from runs); ``None`` means
        every sector. Sectors not in it are zero-filled in the data and clear
        in the bitmap: in a differencing VHD they come from the parent.
        """
        self._place(index)
        self._write(self.block_payload(index, data, sectors))
        self._placed()

    def add_compressed_block(self, index: int, frame: bytes) -> None:
        """Append block ``index`` as one zstd frame of its :meth:`block_payload` (``out.add_frame``)."""
        self._place(index)
        add_frame = getattr(self._out, "add_frame", None)  # SeekableZstdWriter's; other outputs lack it
        if add_frame is None:
            raise TypeError("add_compressed_block needs an output that takes frames (a SeekableZstdWriter)")
        add_frame(frame, self._stride * SECTOR)
        self._placed()

    def close(self) -> VHDInfo:
        """Write the footer (after checking every announced block came)."""
        if self._closed:
            raise ValueError("VHDWriter already closed")
        if self._streaming:
            self._write_tail()
        elif self._next is not None:
            raise ValueError(f"block {self._next} was announced but never written")
        self._write(self._footer.pack())
        self._closed = True
        parent = self._parent
        return VHDInfo(
            disk_type="differencing" if parent else "dynamic",
            unique_id=self._footer.unique_id,
            virtual_size=self.virtual_size,
            block_size=self.block_size,
            allocated_blocks=self.allocated_count,
            timestamp=self._footer.timestamp,
            file_size=self.file_size,
            parent_unique_id=parent.unique_id if parent else None,
            parent_timestamp=parent.timestamp if parent else None,
            parent_name=parent.file_name if parent else None,
        )

    def _write_tail(self) -> None:
        """BAT-last layout: zeros where no block went, then the BAT."""
        room = (self.block_count - self.allocated_count) * self._stride * SECTOR
        write_zeros = getattr(self._out, "write_zeros", None)
        if write_zeros is not None:
            write_zeros(room)
        else:
            zeros = bytes(min(room, 1 << 20))
            while room:
                self._write(zeros[: min(room, len(zeros))])
                room -= min(room, len(zeros))
        bat = array("I", self._bat)
        if sys.byteorder == "little":
            bat.byteswap()  # the BAT is big-endian on disk
        self._write(bat.tobytes() + b"\xff" * (self._bat_bytes - 4 * self.block_count))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._closed:
            self.close()


def _read_exactly(src: Readable, n: int) -> bytes:
    """``n`` bytes from ``src`` (looping over short reads), or fail."""
    data = read_fully(src, n)
    if len(data) != n:
        raise ValueError(f"source ended {n - len(data)} bytes early")
    return data


def _source_size(src: Readable, size: int | None) -> int:
    if size is None:
        size = src.seek(0, 2)
        src.seek(0)
    _check_size(size)
    return size


def scan_allocated(src: Readable, size: int, block_size: int = DEFAULT_BLOCK_SIZE) -> array:
    """Indices of the blocks of a raw disk image that are not all zeros.

    Reads ``src`` from its current position; the caller seeks back. Returns
    an ``array('I')`` (4 bytes per allocated block).
    """
    zero = bytes(block_size)
    allocated = array("I")
    for index in range(-(-size // block_size)):
        data = _read_exactly(src, min(block_size, size - index * block_size))
        if data != zero[: len(data)]:
            allocated.append(index)
    return allocated


def write_dynamic_from_raw(
    src: Readable,
    out: Writable,
    *,
    size: int | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    unique_id: uuid.UUID | None = None,
    timestamp: int | None = None,
) -> VHDInfo:
    """Write a raw disk image (a seekable file or block device) as a dynamic VHD.

    All-zero blocks are left unallocated; that takes a first pass over
    ``src`` to find them. ``size`` defaults to the size of ``src``.
    """
    size = _source_size(src, size)
    start = src.tell()
    allocated = scan_allocated(src, size, block_size)
    writer = VHDWriter(out, size, allocated, block_size=block_size, unique_id=unique_id, timestamp=timestamp)
    for index in allocated:
        src.seek(start + index * block_size)
        writer.write_block(index, _read_exactly(src, min(block_size, size - index * block_size)))
    return writer.close()


def write_fixed(
    src: Readable,
    out: Writable,
    *,
    size: int | None = None,
    unique_id: uuid.UUID | None = None,
    timestamp: int | None = None,
    chunk_size: int = DEFAULT_BLOCK_SIZE,
) -> VHDInfo:
    """Write ``size`` bytes of ``src`` as a fixed VHD: the raw data, then a footer.

    ``src`` is read sequentially; ``size`` must be given when ``src`` cannot
    seek. A frame ends every ``chunk_size`` bytes if ``out`` has ``end_frame()``.
    """
    size = _source_size(src, size)
    footer = Footer(
        disk_type=DiskType.FIXED,
        current_size=size,
        unique_id=unique_id or uuid.uuid4(),
        timestamp=vhd_timestamp() if timestamp is None else timestamp,
        data_offset=NO_OFFSET,
    )
    end_frame = getattr(out, "end_frame", None)
    left = size
    while left:
        out.write(_read_exactly(src, min(chunk_size, left)))
        left -= min(chunk_size, left)
        if end_frame:
            end_frame()
    out.write(footer.pack())
    return VHDInfo(
        disk_type="fixed",
        unique_id=footer.unique_id,
        virtual_size=size,
        block_size=None,
        allocated_blocks=-(-size // DEFAULT_BLOCK_SIZE),
        timestamp=footer.timestamp,
        file_size=size + FOOTER_SIZE,
    )
