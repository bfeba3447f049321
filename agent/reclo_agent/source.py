"""Reading the disk being backed up: a raw image file or a block device.

Reads run in a background thread a few blocks ahead of the consumer, so the
disk is busy while the main thread hashes or compresses (file reads release
the GIL). Memory is the read-ahead depth times the block size. Errors come
out as :class:`~reclo_agent.errors.DiskError` saying what to do.
"""

from __future__ import annotations

import errno
import os
import queue
import stat
import threading
from collections.abc import Iterable, Iterator

from .errors import DiskError, UsageError

SECTOR = 512
READ_AHEAD = 4  # blocks queued ahead of the consumer


class Source:
    """An open disk: ``size`` bytes readable at any offset."""

    def __init__(self, path: str) -> None:
        self.path = path
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
        if hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            except OSError:
                pass  # advice only

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read_at(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset`` (short only at the end of the disk)."""
        length = min(length, self.size - offset)
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
