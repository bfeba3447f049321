"""Seekable zstd storage of restore points.

A stored restore point is its VHD compressed in the zstd seekable format
(``contrib/seekable_format`` of the zstd project): independent zstd frames,
one per VHD block, then a skippable frame holding the seek table (each
frame's compressed and decompressed size). Any zstd tool decompresses it
(``zstd -d`` skips the skippable frame), and a reader that has the seek
table reaches any block by decompressing one frame.

pyzstd's ``SeekableZstdFile`` reads and writes this format. In write mode it
does not need a seekable output: it only calls ``write()`` (trusting its
return value as the number of bytes written) and ``flush()``, and appends the
seek table at ``close()`` -- so it streams straight into an upload, and we
need not write the seek table ourselves. We wrap the output so short writes
cannot corrupt the table, and to count the bytes and hash them: the upload's
``file_size`` and ``sha256`` are known the moment the stream ends.
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from bisect import bisect_right
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO, NamedTuple

import pyzstd

from .errors import VHDError
from .format import DEFAULT_BLOCK_SIZE
from .reader import read_at

DEFAULT_LEVEL = 3
SKIPPABLE_MAGIC = 0x184D2A5E  # the seek table is skippable frame 0xE
SEEKABLE_MAGIC = 0x8F92EAB1
_SEEK_FOOTER = struct.Struct("<IBI")  # number of frames, descriptor, magic
_CORRUPT = (pyzstd.ZstdError, pyzstd.SeekableFormatError, EOFError)


class _CountingSink:
    """Writes everything to ``dst``, counting and hashing it."""

    def __init__(self, dst: BinaryIO) -> None:
        self._dst = dst
        self.size = 0
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> int:
        view = memoryview(data).cast("B")
        self.size += len(view)
        self.sha256.update(view)
        while view:
            written = self._dst.write(view)
            # Raw files may write less; file-likes that return None wrote all.
            if written == 0:
                raise OSError("the output accepted no bytes")
            view = view[len(view) if written is None else written :]
        return len(data)

    def flush(self) -> None:
        if hasattr(self._dst, "flush"):
            self._dst.flush()


class SeekableZstdWriter(pyzstd.SeekableZstdFile):
    """A write-only seekable zstd stream into any writable ``dst``.

    ``dst`` need not be seekable and is not closed. A frame ends when
    :meth:`end_frame` is called (the VHD writers call it after every block)
    or after ``max_frame_size`` bytes. Frames carry zstd's content checksum,
    so corruption is detected on decompression. After :meth:`close`,
    :attr:`compressed_size` and :meth:`sha256` describe the stored object.
    """

    def __init__(
        self, dst: BinaryIO, *, level: int = DEFAULT_LEVEL, max_frame_size: int = 2 * DEFAULT_BLOCK_SIZE
    ) -> None:
        self._sink = _CountingSink(dst)
        options = {pyzstd.CParameter.compressionLevel: level, pyzstd.CParameter.checksumFlag: 1}
        super().__init__(self._sink, "w", level_or_option=options, max_frame_content_size=max_frame_size)

    def end_frame(self) -> None:
        """End the current frame (no-op if nothing was written since)."""
        self.flush(self.FLUSH_FRAME)

    @property
    def compressed_size(self) -> int:
        """Bytes written to ``dst`` so far (all of them once closed)."""
        return self._sink.size

    def sha256(self) -> str:
        """Hex SHA-256 of the bytes written to ``dst`` so far."""
        return self._sink.sha256.hexdigest()


class Stored(NamedTuple):
    """What an upload declares about a stored object."""

    size: int
    sha256: str


def compress_seekable(
    src: BinaryIO, dst: BinaryIO, frame_size: int = DEFAULT_BLOCK_SIZE, *, level: int = DEFAULT_LEVEL
) -> Stored:
    """Compress all of ``src`` (read sequentially) into ``dst`` as seekable zstd.

    One frame per ``frame_size`` bytes. ``dst`` may be non-seekable. (To get
    frames aligned on VHD blocks, write the VHD straight into a
    :class:`SeekableZstdWriter` instead.)
    """
    writer = SeekableZstdWriter(dst, level=level, max_frame_size=frame_size)
    with writer:
        while chunk := src.read(frame_size):
            writer.write(chunk)
    return Stored(writer.compressed_size, writer.sha256())


@contextmanager
def _corrupt_as_vhderror() -> Iterator[None]:
    try:
        yield
    except _CORRUPT as exc:
        raise VHDError(f"corrupt compressed stream: {exc}") from exc


class SeekableReader(pyzstd.SeekableZstdFile):
    """Read-only, seekable view of the decompressed data.

    Errors of a corrupt stream surface as :class:`VHDError` rather than
    zstd's own exceptions.
    """

    def read(self, size: int | None = -1) -> bytes:
        with _corrupt_as_vhderror():
            return super().read(size)

    def read1(self, size: int = -1) -> bytes:
        with _corrupt_as_vhderror():
            return super().read1(size)

    def readinto(self, b) -> int:
        with _corrupt_as_vhderror():
            return super().readinto(b)

    def seek(self, offset: int, whence: int = 0) -> int:
        with _corrupt_as_vhderror():
            return super().seek(offset, whence)


def open_seekable(fileobj: BinaryIO) -> SeekableReader:
    """Open a stored object (any readable, seekable binary file object).

    Only the seek table is read on opening; each read then fetches and
    decompresses the frames it needs, so this works over a ranged-GET file
    object. Raises :class:`VHDError` if there is no valid seek table.
    """
    with _corrupt_as_vhderror():
        return SeekableReader(fileobj, "r")


def _seek_table_at(fileobj: BinaryIO) -> tuple[int, int, int]:
    """(frames, bytes per entry, offset of the seek table's skippable frame), from the stream's footer."""
    size = fileobj.seek(0, 2)
    if size < 17:
        raise VHDError(f"not a seekable zstd stream: {size} bytes is too small for a seek table")
    frames, descriptor, magic = _SEEK_FOOTER.unpack(read_at(fileobj, size - 9, 9, "seek table footer"))
    if magic != SEEKABLE_MAGIC:
        raise VHDError("not a seekable zstd stream: no seek table at the end")
    if descriptor & 0x7C:
        raise VHDError("seek table descriptor has reserved bits set")
    entry = 12 if descriptor & 0x80 else 8
    table_size = 17 + frames * entry
    if table_size > size:
        raise VHDError(f"seek table of {frames} frames does not fit in the {size}-byte stream")
    table_at = size - table_size
    skip_magic, skip_size = struct.unpack("<II", read_at(fileobj, table_at, 8, "seek table"))
    if skip_magic != SKIPPABLE_MAGIC or skip_size != table_size - 8:
        raise VHDError("seek table frame header is wrong")
    return frames, entry, table_at


def _seek_entries(fileobj: BinaryIO, chunk_size: int) -> tuple[int, Iterator[tuple[int, int, int]]]:
    """Where the seek table starts, and its entries as ``(frame, compressed size, decompressed size)``.

    The entries are read ``chunk_size`` bytes of table at a time, so a table
    claiming millions of frames costs no more memory than that.
    """
    frames, entry, table_at = _seek_table_at(fileobj)

    def entries() -> Iterator[tuple[int, int, int]]:
        batch = max(1, chunk_size // entry)
        for first in range(0, frames, batch):
            count = min(batch, frames - first)
            raw = read_at(fileobj, table_at + 8 + first * entry, count * entry, "seek table")
            for n in range(count):
                c_size, d_size = struct.unpack_from("<II", raw, n * entry)
                yield first + n, c_size, d_size

    return table_at, entries()


class SeekTable(NamedTuple):
    """Where each frame of a stored object is: ``c_offsets[i]`` in the object, ``d_offsets[i]`` decompressed.

    Both have one more entry than there are frames (the ends), so frame
    ``i`` is ``c_offsets[i]:c_offsets[i + 1]`` and decompresses to
    ``d_offsets[i + 1] - d_offsets[i]`` bytes.
    """

    c_offsets: array
    d_offsets: array

    def frame_at(self, offset: int) -> int:
        """The frame holding decompressed byte ``offset`` (empty frames are passed over)."""
        if not 0 <= offset < self.d_offsets[-1]:
            raise VHDError(f"offset {offset} is outside the {self.d_offsets[-1]}-byte stream")
        return bisect_right(self.d_offsets, offset) - 1


def read_seek_table(fileobj: BinaryIO, *, chunk_size: int = 1 << 20) -> SeekTable:
    """The frame offsets of a seekable zstd stream, from its seek table (nothing is decompressed).

    For a reader that fetches and decompresses frames itself (many frames
    with one ranged read). pyzstd parses the same table but keeps it
    private. Raises :class:`VHDError` when the table is not well formed or
    describes more bytes than the stream holds.
    """
    table_at, entries = _seek_entries(fileobj, chunk_size)
    c_offsets, d_offsets = array("q", [0]), array("q", [0])
    for _frame, c_size, d_size in entries:
        c_offsets.append(c_offsets[-1] + c_size)
        d_offsets.append(d_offsets[-1] + d_size)
    if c_offsets[-1] != table_at:
        raise VHDError(f"seek table covers {c_offsets[-1]} bytes of {table_at} bytes of frames")
    return SeekTable(c_offsets, d_offsets)


def decompress_frame(data: bytes, d_size: int, frame: int = 0) -> bytes:
    """One whole zstd frame ``data``, which must decompress to exactly ``d_size`` bytes (its checksum checked)."""
    decompressor = pyzstd.ZstdDecompressor()
    with _corrupt_as_vhderror():
        out = decompressor.decompress(data, d_size + 1) if data else b""
    if len(out) != d_size or (data and not decompressor.eof) or decompressor.unused_data:
        raise VHDError(f"frame {frame} does not decompress to the {d_size} bytes of the seek table")
    return out


def check_seekable(fileobj: BinaryIO, *, chunk_size: int = 1 << 20) -> int:
    """Decompress every frame and check it against the seek table.

    The VHD validator reads only the metadata; this proves that all the data
    decompresses, passes the frames' checksums and has the sizes the seek
    table claims (so seeking lands where it should). Memory stays at one
    ``chunk_size`` whatever a (possibly hostile) frame claims. Returns the
    decompressed size; raises :class:`VHDError`.
    """
    table_at, entries = _seek_entries(fileobj, chunk_size)
    position = total = 0
    for frame, c_size, d_size in entries:
        if position + c_size > table_at:
            raise VHDError(f"seek table frame {frame} reaches past the data")
        _check_frame(fileobj, position, c_size, d_size, frame, chunk_size)
        position += c_size
        total += d_size
    if position != table_at:
        raise VHDError(f"seek table covers {position} bytes of {table_at} bytes of frames")
    return total


def _check_frame(f: BinaryIO, offset: int, c_size: int, d_size: int, frame: int, chunk_size: int) -> None:
    decompressor = pyzstd.ZstdDecompressor()
    produced = 0
    done = 0
    with _corrupt_as_vhderror():
        while done < c_size:
            n = min(chunk_size, c_size - done)
            data = read_at(f, offset + done, n, f"frame {frame}")
            done += n
            if decompressor.eof:
                raise VHDError(f"frame {frame} has trailing data after its end")
            produced += len(decompressor.decompress(data, chunk_size))
            while not decompressor.eof and not decompressor.needs_input:
                produced += len(decompressor.decompress(b"", chunk_size))
                if produced > d_size:
                    break
            if produced > d_size:
                raise VHDError(f"frame {frame} decompresses to more than the {d_size} bytes in the seek table")
    if c_size and not decompressor.eof:
        raise VHDError(f"frame {frame} is cut short")
    if decompressor.eof and decompressor.unused_data:
        raise VHDError(f"frame {frame} has trailing data after its end")
    if produced != d_size:
        raise VHDError(f"frame {frame} decompresses to {produced} bytes, the seek table says {d_size}")
