"""Seekable zstd storage of restore points.

A stored restore point is its VHD compressed in the zstd seekable format
(``contrib/seekable_format`` of the zstd project): independent zstd frames,
one per VHD block, then a skippable frame holding the seek table (each
frame's compressed and decompressed size). Any zstd tool decompresses it
(``zstd -d`` skips the skippable frame), and a reader that has the seek
table reaches any block by decompressing one frame.

pyzstd's ``SeekableZstdFile`` reads this format. Its writer compresses in the
calling thread, one frame after the other; the agent compresses blocks on
every core, so :class:`SeekableZstdWriter` is our own (the format is a
seek table of two integers per frame, see ``write_seek_table``): it
compresses what is written into it, and also takes frames compressed
elsewhere (:meth:`SeekableZstdWriter.add_frame`, with
:func:`compress_frame` in pool threads; zstd releases the GIL). It never
seeks its output, so it streams straight into an upload, and it counts and
hashes what it writes: the upload's ``file_size`` and ``sha256`` are known
the moment the stream ends. Output is deterministic (single-threaded zstd
per frame, fixed level), which a resumed upload relies on.
"""

from __future__ import annotations

import hashlib
import struct
import sys
import threading
from array import array
from bisect import bisect_right
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO, NamedTuple, cast

import pyzstd

from .errors import VHDError
from .format import DEFAULT_BLOCK_SIZE
from .reader import read_at
from .streams import Readable, Writable

DEFAULT_LEVEL = 3
SKIPPABLE_MAGIC = 0x184D2A5E  # the seek table is skippable frame 0xE
SEEKABLE_MAGIC = 0x8F92EAB1
_SEEK_FOOTER = struct.Struct("<IBI")  # number of frames, descriptor, magic
_CORRUPT = (pyzstd.ZstdError, pyzstd.SeekableFormatError, EOFError)


class _CountingSink:
    """Writes everything to ``dst``, counting and hashing it."""

    def __init__(self, dst: Writable) -> None:
        self._dst = dst
        self.size = 0
        self.sha256 = hashlib.sha256()

    def write(self, data) -> int:
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


def _options(level: int) -> dict:
    # Frames carry zstd's content checksum: corruption shows on decompression.
    return {pyzstd.CParameter.compressionLevel: level, pyzstd.CParameter.checksumFlag: 1}


_local = threading.local()


def compress_frame(data, level: int = DEFAULT_LEVEL) -> bytes:
    """``data`` as one complete zstd frame (callable from any thread; one context per thread)."""
    compressors = getattr(_local, "compressors", None)
    if compressors is None:
        compressors = _local.compressors = {}
    compressor = compressors.get(level)
    if compressor is None:
        compressor = compressors[level] = pyzstd.ZstdCompressor(_options(level))
    return compressor.compress(data, pyzstd.ZstdCompressor.FLUSH_FRAME)


# Zero runs (the unused room before a streamed VHD's BAT) go in frames of
# this size; one such frame is compressed once per process and repeated.
ZERO_FRAME = 256 * 1024 * 1024
_ZERO_CHUNK = 2 * 1024 * 1024
_zero_frames: dict[tuple[int, int], bytes] = {}


def zero_frame(size: int, level: int = DEFAULT_LEVEL) -> bytes:
    """A zstd frame of ``size`` zero bytes (cached), compressed in chunks so memory stays small."""
    frame = _zero_frames.get((size, level))
    if frame is None:
        compressor = pyzstd.ZstdCompressor(_options(level))
        zeros = bytes(min(size, _ZERO_CHUNK))
        out, left = [], size
        while left > len(zeros):
            out.append(compressor.compress(zeros, compressor.CONTINUE))
            left -= len(zeros)
        out.append(compressor.compress(zeros[:left], compressor.FLUSH_FRAME))
        frame = b"".join(out)
        if size == ZERO_FRAME:
            _zero_frames[(size, level)] = frame
    return frame


def write_seek_table(out, frames: array) -> None:
    """The seek table of the zstd seekable format: a skippable frame listing every frame.

    ``frames`` holds (compressed size, decompressed size) pairs, flat. No
    per-frame checksums (the frames carry their own).
    """
    count = len(frames) // 2
    entries = array("I", frames)
    if sys.byteorder != "little":
        entries.byteswap()
    body = entries.tobytes() + _SEEK_FOOTER.pack(count, 0, SEEKABLE_MAGIC)
    out.write(struct.pack("<II", SKIPPABLE_MAGIC, len(body)) + body)


class SeekableZstdWriter:
    """A write-only seekable zstd stream into any writable ``dst``.

    ``dst`` need not be seekable and is not closed. What is written is
    compressed into the current frame; a frame ends when :meth:`end_frame`
    is called (the VHD writers call it after every block) or after
    ``max_frame_size`` bytes. :meth:`add_frame` appends a frame compressed
    elsewhere (:func:`compress_frame`), :meth:`write_zeros` a run of zeros
    for almost nothing. :meth:`close` writes the seek table; then
    :attr:`compressed_size` and :meth:`sha256` describe the stored object.
    Memory: 8 bytes per frame for the seek table.
    """

    def __init__(
        self, dst: Writable, *, level: int = DEFAULT_LEVEL, max_frame_size: int = 2 * DEFAULT_BLOCK_SIZE
    ) -> None:
        if not 0 < max_frame_size < 1 << 32:
            raise ValueError("a frame's size must fit the seek table's 32 bits")
        self._sink = _CountingSink(dst)
        self.level = level
        self._compressor = pyzstd.ZstdCompressor(_options(level))
        self._max_frame = max_frame_size
        self._frame_in = 0  # bytes of the current frame, before and after compression
        self._frame_out = 0
        self._frames = array("I")  # (compressed, decompressed) per frame, flat
        self.closed = False

    @property
    def frame_count(self) -> int:
        return len(self._frames) // 2

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        """Compress ``data`` into the current frame (frames end at ``max_frame_size``)."""
        if self.closed:
            raise ValueError("write to a closed SeekableZstdWriter")
        view = memoryview(data).cast("B")
        total = len(view)
        while view:
            chunk = view[: self._max_frame - self._frame_in]
            out = self._compressor.compress(chunk, self._compressor.CONTINUE)
            self._frame_in += len(chunk)
            self._emit(out)
            view = view[len(chunk) :]
            if self._frame_in >= self._max_frame:
                self.end_frame()
        return total

    def _emit(self, out: bytes) -> None:
        if out:
            self._sink.write(out)
            self._frame_out += len(out)

    def end_frame(self) -> None:
        """End the current frame (no-op if nothing was written since)."""
        if self._frame_in:
            self._emit(self._compressor.flush(self._compressor.FLUSH_FRAME))
            self._frames.extend((self._frame_out, self._frame_in))
            self._frame_in = self._frame_out = 0

    def add_frame(self, frame: bytes, size: int) -> None:
        """Append one complete zstd frame, compressed elsewhere, of ``size`` bytes decompressed."""
        if self.closed:
            raise ValueError("add_frame() on a closed SeekableZstdWriter")
        if not 0 < size < 1 << 32:
            raise ValueError("a frame's size must fit the seek table's 32 bits")
        self.end_frame()
        self._sink.write(frame)
        self._frames.extend((len(frame), size))

    def write_zeros(self, size: int) -> None:
        """Append ``size`` zero bytes as repeated, cached zero frames."""
        self.end_frame()
        while size:
            n = min(size, ZERO_FRAME)
            self.add_frame(zero_frame(n, self.level), n)
            size -= n

    def flush(self) -> None:
        self._sink.flush()

    def close(self) -> None:
        """End the last frame and write the seek table (once)."""
        if self.closed:
            return
        self.end_frame()
        write_seek_table(self._sink, self._frames)
        self.closed = True
        self._sink.flush()

    def __enter__(self) -> SeekableZstdWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

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
    src: Readable, dst: Writable, frame_size: int = DEFAULT_BLOCK_SIZE, *, level: int = DEFAULT_LEVEL
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


def open_seekable(fileobj: Readable) -> SeekableReader:
    """Open a stored object (any readable, seekable binary file object).

    Only the seek table is read on opening; each read then fetches and
    decompresses the frames it needs, so this works over a ranged-GET file
    object. Raises :class:`VHDError` if there is no valid seek table.
    """
    with _corrupt_as_vhderror():
        return SeekableReader(cast(BinaryIO, fileobj), "r")  # any object with read/seek/tell


def _seek_table_at(fileobj: Readable) -> tuple[int, int, int]:
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


def _seek_entries(fileobj: Readable, chunk_size: int) -> tuple[int, Iterator[tuple[int, int, int]]]:
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


def read_seek_table(fileobj: Readable, *, chunk_size: int = 1 << 20) -> SeekTable:
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


def decompress_frame(data: bytes | memoryview, d_size: int, frame: int = 0) -> bytes:
    """One whole zstd frame ``data``, which must decompress to exactly ``d_size`` bytes (its checksum checked)."""
    decompressor = pyzstd.ZstdDecompressor()
    with _corrupt_as_vhderror():
        out = decompressor.decompress(data, d_size + 1) if data else b""
    if len(out) != d_size or (data and not decompressor.eof) or decompressor.unused_data:
        raise VHDError(f"frame {frame} does not decompress to the {d_size} bytes of the seek table")
    return out


def check_seekable(fileobj: Readable, *, chunk_size: int = 1 << 20) -> int:
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


def _check_frame(f: Readable, offset: int, c_size: int, d_size: int, frame: int, chunk_size: int) -> None:
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
