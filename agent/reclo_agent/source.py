"""Reading the disk being backed up: a raw image file or a block device.

Block devices are read with ``O_DIRECT``, from the disk itself. The page
cache of a whole-disk device is separate from its partitions' caches (which
the mounted file systems write through) and outlives a run, so buffered
reads of a disk in use return what an earlier run read, not what the disk
holds now: every incremental would miss the changes. ``O_DIRECT`` needs
buffers, offsets and lengths aligned to the device's logical sector size;
reads go into page-aligned ``mmap`` buffers (one per reading thread). A
device that refuses ``O_DIRECT`` (EINVAL) is read through the cache after
dropping it (``BLKFLSBUF`` and ``POSIX_FADV_DONTNEED``) at the start of each
pass, and the log says so once. Image files are read through the cache:
it is the same cache their writers write through, so it is never stale.

Reads run in a background thread a few blocks ahead of the consumer, so the
disk is busy while the main thread hashes or compresses (file reads release
the GIL). Memory is the read-ahead depth times the block size. Errors come
out as :class:`~reclo_agent.errors.DiskError` saying what to do.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import queue
import stat
import struct
import threading
from collections.abc import Iterable, Iterator

from .errors import DiskError, UsageError

log = logging.getLogger(__name__)

SECTOR = 512
READ_AHEAD = 4  # blocks queued ahead of the consumer
BLKSSZGET = 0x1268  # <linux/fs.h>: the logical sector size
BLKFLSBUF = 0x1261  # <linux/fs.h>: write back and drop the device's buffer cache

# How a source is read (``Source.read_mode``).
DIRECT = "direct"  # O_DIRECT: the disk itself
INVALIDATED = "invalidated"  # through the cache, dropped before each pass
FILE = "file"  # an image file, through the cache its writers share


class Source:
    """An open disk: ``size`` bytes readable at any offset."""

    def __init__(self, path: str, *, direct: bool = True) -> None:
        """Open ``path``; ``direct=False`` reads a block device through its (dropped) cache."""
        self.path = path
        self._local = threading.local()
        self._interrupted: BaseException | None = None
        self.bytes_read = 0  # by read_at: what a backup costs the disk
        try:
            self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError as exc:
            raise DiskError(f"Cannot read {path}: no such file or device.") from exc
        except PermissionError as exc:
            raise DiskError(
                f"Cannot read {path}: permission denied. Block devices need root (sudo reclo-agent ...)."
            ) from exc
        except OSError as exc:
            raise DiskError(f"Cannot open {path}: {exc.strerror}.") from exc
        try:
            st = os.fstat(self._fd)
            self.is_block_device = stat.S_ISBLK(st.st_mode)
            if not (self.is_block_device or stat.S_ISREG(st.st_mode)):
                raise UsageError(f"{path} is neither a block device nor a raw disk image file.")
            # st_size is 0 for block devices; seeking to the end gives their size.
            self.size = os.lseek(self._fd, 0, os.SEEK_END) if self.is_block_device else st.st_size
        except BaseException:
            os.close(self._fd)
            raise
        if self.size == 0:
            self.close()
            raise DiskError(f"{path} is empty; there is nothing to back up.")
        if self.size % SECTOR:
            self.close()
            raise DiskError(
                f"{path} is {self.size} bytes, not a whole number of 512-byte sectors: not a raw disk image."
            )
        self.identity = (st.st_dev, st.st_ino)
        self.rdev = st.st_rdev if self.is_block_device else None
        self.read_mode = FILE
        self.align = SECTOR
        if self.is_block_device:
            self._open_block_device(direct)
        if hasattr(os, "posix_fadvise") and self.read_mode != DIRECT:
            try:
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            except OSError:
                pass  # advice only

    def _open_block_device(self, direct: bool) -> None:
        try:
            self.align = max(SECTOR, struct.unpack("i", fcntl.ioctl(self._fd, BLKSSZGET, b"\0" * 4))[0])
        except OSError:
            self.align = SECTOR
        if direct:
            why = self._try_direct()
            if why is None:
                self.read_mode = DIRECT
                return
            log.warning("%s refuses O_DIRECT reads (%s): reading it through the page cache, dropped before "
                        "each pass", self.path, why)  # fmt: skip
        self.read_mode = INVALIDATED
        self.invalidate()

    def _try_direct(self) -> str | None:
        """Reopen with O_DIRECT and read the first sector; None when that works, else why not."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            return exc.strerror or str(exc)
        try:
            with memoryview(self._buffer(self.align))[: self.align] as view:
                os.preadv(fd, [view], 0)
        except OSError as exc:
            os.close(fd)
            if exc.errno != errno.EINVAL:
                raise self._read_error(exc, 0) from exc
            return exc.strerror or str(exc)
        os.close(self._fd)
        self._fd = fd
        return None

    def invalidate(self) -> None:
        """Drop what the page cache holds of a block device read without O_DIRECT.

        ``BLKFLSBUF`` needs CAP_SYS_ADMIN; ``POSIX_FADV_DONTNEED`` drops the
        clean pages without it. Nothing to do for O_DIRECT and image files.
        """
        if self.read_mode != INVALIDATED:
            return
        try:
            fcntl.ioctl(self._fd, BLKFLSBUF, 0)
        except OSError as exc:
            log.debug("BLKFLSBUF on %s: %s", self.path, exc.strerror)
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def interrupt(self, error: BaseException) -> None:
        """Make every later read raise ``error`` (a freeze's time limit ran out, say)."""
        self._interrupted = error

    def _buffer(self, size: int) -> mmap.mmap:
        """This thread's page-aligned buffer of at least ``size`` bytes (O_DIRECT's alignment)."""
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < size:
            if buf is not None:
                buf.close()
            buf = self._local.buf = mmap.mmap(-1, max(size, mmap.PAGESIZE))
        return buf

    def close(self) -> None:
        buf = getattr(self._local, "buf", None)
        if buf is not None:
            buf.close()
            self._local.buf = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read_at(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset`` (short only at the end of the disk)."""
        if self._interrupted is not None:
            raise self._interrupted
        length = min(length, self.size - offset)
        self.bytes_read += max(0, length)  # one reading thread per pass: no lock needed
        if self.read_mode == DIRECT:
            return self._read_direct(offset, length)
        chunks, done = [], 0
        while done < length:
            try:
                chunk = os.pread(self._fd, length - done, offset + done)
            except OSError as exc:
                raise self._read_error(exc, offset + done) from exc
            if not chunk:
                raise DiskError(
                    f"{self.path} ended at {offset + done} bytes while reading; did the disk shrink during the backup?"
                )
            chunks.append(chunk)
            done += len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _read_direct(self, offset: int, length: int) -> bytes:
        # Aligned start and end around the range asked for; a read that
        # passes the end of the disk comes back short, which is all we need.
        start = offset - offset % self.align
        end = -(-(offset + length) // self.align) * self.align
        buf = self._buffer(end - start)
        done = 0
        with memoryview(buf) as view:
            while start + done < min(end, offset + length):
                try:
                    n = os.preadv(self._fd, [view[done : end - start]], start + done)
                except OSError as exc:
                    raise self._read_error(exc, start + done) from exc
                if n == 0:
                    raise DiskError(
                        f"{self.path} ended at {start + done} bytes while reading; did the disk shrink during the "
                        "backup?"
                    )
                done += n
        return buf[offset - start : offset - start + length]

    def _read_error(self, exc: OSError, offset: int) -> DiskError:
        if exc.errno == errno.EIO:
            return DiskError(
                f"{self.path} is unreadable: I/O error at byte {offset}. The disk may be failing; "
                "check `dmesg` and the disk's health before trusting it."
            )
        return DiskError(f"Cannot read {self.path} at byte {offset}: {exc.strerror}.")

    def blocks(self, block_size: int, indices: Iterable[int] | None = None) -> Iterator[tuple[int, bytes]]:
        """``(index, data)`` for each block (all, or ``indices`` in the order given).

        Read ahead by a thread; the last block of the disk may be short.
        """
        if indices is None:
            indices = range(-(-self.size // block_size))
        self.invalidate()  # each pass reads what the disk holds now
        return _read_ahead(self, block_size, indices)


_DONE = object()


def _read_ahead(src: Source, block_size: int, indices: Iterable[int]) -> Iterator[tuple[int, bytes]]:
    q: queue.Queue = queue.Queue(maxsize=READ_AHEAD)
    stop = threading.Event()

    def produce() -> None:
        try:
            for index in indices:
                if stop.is_set():
                    return
                item = (index, src.read_at(index * block_size, block_size))
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
            q.put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            q.put(exc)

    thread = threading.Thread(target=produce, name="reclo-read", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        # Unblock a producer waiting on a full queue, then let it end.
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)
