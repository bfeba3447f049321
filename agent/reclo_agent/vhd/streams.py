"""What the VHD code needs of the files it reads and writes.

Real files, and streams over S3 or zstd (``io.RawIOBase`` subclasses, not
``typing.BinaryIO``). A raw stream's ``read`` may return None (no data yet
on a non-blocking file): the VHD code treats an empty or None read as the
end, which is what a blocking file means by it.
"""

from typing import Protocol

Buffer = bytes | bytearray | memoryview


class Readable(Protocol):
    """A seekable byte source: a disk image, a stored restore point."""

    def read(self, size: int = -1, /) -> bytes | None: ...

    def seek(self, offset: int, whence: int = 0, /) -> int: ...

    def tell(self) -> int: ...


class Writable(Protocol):
    """A byte sink: a file, an upload, a compressor."""

    def write(self, data: Buffer, /) -> int | None: ...


def read_fully(src: Readable, n: int) -> bytes:
    """Up to ``n`` bytes from ``src``'s position, looping over short reads; shorter only where ``src`` ends."""
    chunks, left = [], n
    while left > 0:
        chunk = src.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
