"""``reclo-agent restore BACKUP_ID TARGET``: write a restore point back to a disk.

The portal's download grant names the chain (base first) and gives
read-only credentials for exactly those objects. Each object is streamed
from S3 (:class:`~reclo_agent.s3stream.ObjectStream`: many ranged GETs in
flight, in order, hashed on the way) and its metadata opened as a VHD
(seek table, footer, header, BAT). Then, block by block in disk order,
the main thread cuts each layer's compressed frames of the block out of
the streams and a pool of threads (one per core; zstd releases the GIL)
decompresses them and stacks the layers by their sector bitmaps; the
blocks come back in order to a writer thread. Downloading, decompressing
and writing overlap, on every core. Nothing is staged on local disk.

Checks: zstd frame checksums and the VHD structure as the data is read; at
the end every object's size and SHA-256 against what the portal recorded.
A mismatch fails the restore (exit 7) -- the target must not be trusted.

``--changed-since BACKUP_ID`` (``changed_since``): the target already holds
restore point BACKUP_ID, an ancestor of the one restored (a failback's
restore point on the failover's, say). Only the objects above BACKUP_ID
in the chain are downloaded, and only the blocks they store are written:
each one's sectors from them, its other sectors as the target has them.
The target is neither truncated nor zero-filled; it must be exactly the
disk's size (a file) or at least it (a device), and needs ``--force`` like
any overwrite.

Targets: a regular file is truncated and written sparse (blocks that are
all zeros are skipped); a block device (or an existing file, which would be
overwritten) needs ``--force``, and on a device every block is written,
zeros included, since its old content must not show through.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import stat
import threading
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from .api import PortalClient
from .blockmap import zeros
from .errors import DiskError, NoSpace, UsageError, VerificationFailed
from .progress import Reporter, Task, human_bytes
from .s3 import S3Access, StorageError
from .s3stream import ObjectStream
from .scan import workers
from .vhd import ChainReader, VHDError, VHDReader, open_seekable
from .vhd.reader import stack_block
from .vhd.seekzstd import decompress_frame, read_seek_table
from .vhd.streams import read_fully

log = logging.getLogger(__name__)

# What S3 answers when the pinned version (or ETag) of an object is not there.
CHANGED_CODES = {"PreconditionFailed", "NoSuchVersion", "412"}

MiB = 1024 * 1024
WRITE_QUEUE = 8  # blocks waiting for the writer thread
DOWNLOAD_THREADS = 8
# Read-ahead memory shared by the chain's objects.
READ_AHEAD_BUDGET = 256 * MiB
MIN_SHARE = 32 * MiB  # what even a small object's stream gets (within a fair share)
# Written out behind the restore every so much (see _Writer._flush_behind).
FLUSH_WINDOW = 64 * MiB
Block = bytes | memoryview


def read_ahead_shares(sizes: list[int], budget: int = READ_AHEAD_BUDGET) -> list[int]:
    """Each object's share of the read-ahead memory: a small object gets what it can use, the rest go to the
    larger ones (a full of hundreds of MiB under a chain of small incrementals takes most of it)."""
    shares = [0] * len(sizes)
    left = budget
    for done, n in enumerate(sorted(range(len(sizes)), key=sizes.__getitem__)):
        fair = left // (len(sizes) - done)
        shares[n] = min(max(sizes[n], MIN_SHARE), fair)
        left -= shares[n]
    return shares


def stream_plan(size: int, share: int) -> tuple[int, int]:
    """``(chunk size, chunks ahead)`` of one object's ranged GETs, within ``share`` bytes of read-ahead.

    Large ranges (an eighth of the object, 8-64 MiB) mean few requests: each
    has a fixed cost, and some S3-compatible stores (moto among them) read
    the whole object to answer any range -- on the local emulator this halves
    a 1 GiB restore against 16 ranges of up to 32 MiB. S3 itself serves large
    ranges at full speed. The shares of all layers together stay within
    READ_AHEAD_BUDGET however long the chain (:func:`read_ahead_shares`).
    """
    chunk = min(64 * MiB, max(8 * MiB, size // 8))
    chunk = max(MiB, min(chunk, share // 3)) // MiB * MiB
    ahead = max(1, min(6, share // chunk - 1))
    return chunk, ahead


@dataclass
class RestoreResult:
    backup_id: str
    virtual_size: int
    layers: int
    downloaded: int
    written: int
    timings: dict = field(default_factory=dict)
    requests: int = 0  # GETs sent to cloud storage


class Target:
    """The restore target, opened for writing (see the module doc)."""

    def __init__(self, path: str, size: int, *, force: bool, keep: bool = False) -> None:
        """``keep``: write onto what the target holds (``--changed-since``): no truncation, sizes must fit."""
        self.path = path
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise DiskError(f"Cannot use {path} as the restore target: {exc.strerror}.") from exc
        self.fsync_seconds = 0.0
        self.is_device = st is not None and stat.S_ISBLK(st.st_mode)
        if st is not None and not (self.is_device or stat.S_ISREG(st.st_mode)):
            raise UsageError(f"{path} is neither a block device nor a regular file.")
        if keep and st is None:
            raise UsageError(
                f"{path} does not exist: --changed-since writes onto a disk that holds the earlier restore point."
            )
        if keep and not self.is_device and st is not None and st.st_size != size:
            raise UsageError(
                f"{path} is {st.st_size} bytes, the restore point a {size}-byte disk: it cannot hold the earlier "
                "restore point. Restore without --changed-since."
            )
        if st is not None and (self.is_device or st.st_size > 0) and not force:
            what = "the block device" if self.is_device else "the existing file"
            raise UsageError(f"Restoring would overwrite {what} {path}. Add --force if that is what you want.")
        # Written onto (keep), its blocks are read too: those the restore point holds only in part.
        mode = os.O_RDWR if keep else os.O_WRONLY
        flags = mode | getattr(os, "O_CLOEXEC", 0) | (0 if self.is_device or keep else os.O_CREAT)
        try:
            self.fd = os.open(path, flags, 0o600)
        except PermissionError as exc:
            raise DiskError(f"Cannot write {path}: permission denied (block devices need root).") from exc
        except OSError as exc:
            raise DiskError(f"Cannot open {path} for writing: {exc.strerror}.") from exc
        try:
            if self.is_device:
                device_size = os.lseek(self.fd, 0, os.SEEK_END)
                if device_size < size:
                    raise NoSpace(
                        f"{path} holds {device_size} bytes; the restore point is a {size}-byte disk. "
                        "Restore to a device at least that large."
                    )
            elif not keep:
                # Truncate to nothing first, so every block not written reads as zeros.
                os.ftruncate(self.fd, 0)
                os.ftruncate(self.fd, size)
        except OSError as exc:
            os.close(self.fd)
            raise _write_error(path, exc) from exc
        except BaseException:
            os.close(self.fd)
            raise

    def check_space(self, needed: int) -> None:
        if self.is_device:
            return
        vfs = os.fstatvfs(self.fd)
        free = vfs.f_bavail * vfs.f_frsize
        if free < needed:
            raise NoSpace(
                f"Not enough space for {self.path}: the restore needs up to {human_bytes(needed)}, "
                f"{human_bytes(free)} are free. Free some space or restore elsewhere."
            )

    def close(self) -> None:
        """Flush to the disk (a restore must survive a power cut right after) and close."""
        if self.fd >= 0:
            t0 = time.monotonic()
            try:
                os.fsync(self.fd)
            finally:
                os.close(self.fd)
                self.fd = -1
                self.fsync_seconds = time.monotonic() - t0


def _write_error(path: str, exc: OSError) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return NoSpace(f"Out of space writing {path} ({exc.strerror}). Free some space or restore elsewhere.")
    return DiskError(f"Cannot write {path}: {exc.strerror}.")


class _Writer:
    """Writes ``(offset, data)`` to the target from a thread, in order of arrival."""

    def __init__(self, target: Target) -> None:
        self._target = target
        self._queue: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE)
        self._error: BaseException | None = None
        self.written = 0
        self._window_start = self._previous_start = self._window_bytes = 0
        self._thread = threading.Thread(target=self._run, name="reclo-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain after a failure
            offset, data = item
            try:
                view = memoryview(data)
                while view:
                    n = os.pwrite(self._target.fd, view, offset)
                    view, offset = view[n:], offset + n
                self.written += len(data)
                self._flush_behind(offset, len(data))
            except OSError as exc:
                self._error = _write_error(self._target.path, exc)

    def _flush_behind(self, end: int, written: int) -> None:
        """Every FLUSH_WINDOW written, start writing it out, and drop the window before it from the page cache.

        Otherwise the kernel holds the restore dirty in memory and writes it
        at the final fsync, which the restore waits for, and a disk-sized
        restore pushes everything else out of the cache. POSIX_FADV_DONTNEED
        starts the writeback of a range without waiting for it, and drops
        the range's pages that are already written. Writes come in disk
        order, so the windows move forward.
        """
        self._window_bytes += written
        if self._window_bytes < FLUSH_WINDOW:
            return
        try:
            os.posix_fadvise(self._target.fd, self._previous_start, end - self._previous_start, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass  # advice only
        self._previous_start, self._window_start, self._window_bytes = self._window_start, end, 0

    def put(self, offset: int, data: bytes | memoryview) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((offset, data))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


def restore(
    api: PortalClient,
    backup_id: str,
    target_path: str,
    reporter: Reporter,
    *,
    force: bool = False,
    changed_since: str | None = None,
) -> RestoreResult:
    """Write restore point ``backup_id`` to ``target_path`` (see the module doc).

    ``changed_since``: the target holds that ancestor already; write only what differs from it.
    """
    return RestoreRun(api, backup_id, target_path, reporter, force=force, changed_since=changed_since).run()


class Layer:
    """One object of the chain: its VHD's metadata, and where each of its frames is."""

    def __init__(self, stream, reader: VHDReader) -> None:
        self.stream = stream
        self.reader = reader
        self.c_offsets, self.d_offsets = read_seek_table(stream)
        self.stride = reader.block_size + reader.bitmap_size

    def frames_of(self, index: int) -> tuple[bytes | memoryview, int, list[tuple[int, int]]] | None:
        """The compressed frames holding block ``index`` (bitmap and data), where it starts in them, and each frame's
        ``(compressed, decompressed)`` size.

        None when this layer does not store the block. Blocks are asked for
        in increasing order, so the reads move forward through the stream.
        """
        if not self.reader.is_allocated(index):
            return None
        start = self.reader.bat_entry(index) * 512
        first = bisect_right(self.d_offsets, start) - 1
        last = bisect_right(self.d_offsets, start + self.stride - 1) - 1
        if first < 0 or last + 1 >= len(self.c_offsets):
            raise VHDError(f"block {index} is outside the stored frames")
        c, d = self.c_offsets, self.d_offsets
        sizes = [(c[n + 1] - c[n], d[n + 1] - d[n]) for n in range(first, last + 1)]
        span = getattr(self.stream, "read_span", None)
        if span is not None:  # an ObjectStream: a view of its chunk, not a copy
            frames = span(c[first], c[last + 1] - c[first])
        else:
            self.stream.seek(c[first])
            frames = _read_exactly(self.stream, c[last + 1] - c[first])
        return frames, start - d[first], sizes


def _read_exactly(f, n: int) -> bytes:
    data = read_fully(f, n)
    if len(data) != n:
        raise VHDError("the stored object ends inside a frame")
    return data


def _assemble(index: int, length: int, pieces: list, block_size: int, bitmap_size: int) -> tuple[Block, bool]:
    """In a pool thread: decompress each layer's frames of the block and stack them (top layer first).

    Returns the block and whether it is all zeros (checked here, off the main thread).
    """
    stored, origins = _stored_blocks(index, pieces, block_size, bitmap_size)
    return _with_zero_flag(stack_block(stored, block_size, length), origins, length)


def _with_zero_flag(block: Block, origins: list[tuple[bytes, int]], length: int) -> tuple[Block, bool]:
    zero = zeros(length)
    if isinstance(block, memoryview):
        # A view of one layer's decompressed frame (memoryviews compare item by item: compare the bytes under it).
        raw, start = next((raw, start) for raw, start in origins if block.obj is raw)
        return block, raw.startswith(zero, start)
    return block, block == zero


def _stored_blocks(index: int, pieces: list, block_size: int, bitmap_size: int) -> tuple[list, list]:
    """Each layer's stored block ``(bitmap, data)``, decompressed from its frames (top layer first), and where
    each data starts in its decompressed bytes.

    The data is a view into the decompressed frame: restoring copies each block once, into the target.
    """
    stored, origins = [], []
    for frames, at, sizes in pieces:
        raw = _decompress(index, frames, sizes)
        if len(raw) < at + bitmap_size + block_size:
            raise VHDError(f"block {index}: its frames are shorter than the block")
        view, start = memoryview(raw), at + bitmap_size
        stored.append((bytes(view[at:start]), view[start : start + block_size]))
        origins.append((raw, start))
    return stored, origins


def _decompress(index: int, frames, sizes: list[tuple[int, int]]) -> bytes:
    """Whole zstd frames, each to exactly its seek table size (the output allocated once, at that size)."""
    view, out, pos = memoryview(frames), [], 0
    try:
        for c_size, d_size in sizes:
            out.append(decompress_frame(view[pos : pos + c_size], d_size))
            pos += c_size
    except VHDError as exc:
        raise VHDError(f"block {index}: corrupt compressed frame ({exc})") from exc
    return out[0] if len(out) == 1 else b"".join(out)


class RestoreRun:
    """One restore (see the module doc); :meth:`run` returns the :class:`RestoreResult`."""

    def __init__(self, api: PortalClient, backup_id: str, target_path: str, reporter: Reporter, *,
                 force: bool = False, changed_since: str | None = None) -> None:  # fmt: skip
        self.changed_since = changed_since
        self.api = api
        self.backup_id = backup_id
        self.target_path = target_path
        self.reporter = reporter
        self.force = force
        self.downloaded = 0
        self._lock = threading.Lock()
        self._task: Task | None = None
        self._total_stored = 0

    def _count(self, n: int) -> None:
        with self._lock:
            self.downloaded += n
        if self._task is not None:
            self._task.set_note(f"downloaded {human_bytes(self.downloaded)} of {human_bytes(self._total_stored)}")

    def run(self) -> RestoreResult:
        t_start = time.monotonic()
        backup_id, target_path = self.backup_id, self.target_path
        grant = self.api.download(backup_id)
        chain = grant.get("chain") or []
        if not chain:
            raise VerificationFailed(f"The portal returned an empty chain for backup {backup_id}.")
        if self.changed_since:
            chain = _above(chain, self.changed_since, backup_id)
        # Fresh read credentials for a long restore come from asking again.
        s3 = S3Access(grant, refresh=lambda: self.api.download(backup_id)["credentials"],
                      max_connections=DOWNLOAD_THREADS + 2)  # fmt: skip
        self._total_stored = sum(int(item.get("file_size") or 0) for item in chain)
        log.info("restoring backup %s: a chain of %d (%s stored) to %s", backup_id, len(chain),
                 human_bytes(self._total_stored), target_path)  # fmt: skip
        streams: list[ObjectStream] = []
        with ThreadPoolExecutor(DOWNLOAD_THREADS, thread_name_prefix="reclo-get") as pool:
            try:
                sizes = [self._size(s3, item) for item in chain]
                for item, size, share in zip(chain, sizes, read_ahead_shares(sizes), strict=True):
                    streams.append(self._open(s3, item, size, share, pool))
                try:
                    layers = [Layer(stream, VHDReader(open_seekable(stream))) for stream in streams]
                    # Above an ancestor the target holds, the lowest layer's parent is not read:
                    # the links among the layers read are still checked.
                    chain_reader = ChainReader([layer.reader for layer in layers], _check=not self.changed_since)
                    if self.changed_since:
                        _check_links_above(layers)
                except VHDError as exc:
                    raise VerificationFailed(f"Restore point {backup_id} is not a readable chain: {exc}") from exc
                size = chain_reader.virtual_size
                target = Target(target_path, size, force=self.force, keep=bool(self.changed_since))
                try:
                    allocated = list(chain_reader.allocated_blocks())
                    if not self.changed_since:
                        target.check_space(len(allocated) * chain_reader.block_size)
                    with self.reporter.task("restoring", size) as task:
                        self._task = task
                        if self.changed_since:
                            written = write_changed(layers, chain_reader, allocated, target, task)
                        else:
                            written = write_disk(layers, chain_reader, allocated, target, task)
                        task.set_note(f"downloaded {human_bytes(self.downloaded)}")
                    _verify(chain, streams, backup_id)
                finally:
                    target.close()
            except VHDError as exc:
                raise VerificationFailed(
                    f"Restore point {backup_id} is corrupt ({exc}); {target_path} must not be trusted."
                ) from exc
            except StorageError as exc:
                if exc.code not in CHANGED_CODES:
                    raise
                raise VerificationFailed(
                    f"An object of restore point {backup_id} in cloud storage is not the version the portal "
                    f"verified ({exc.code}): it was replaced or removed since. Refusing to restore from it; "
                    f"{target_path} must not be trusted."
                ) from exc
            finally:
                for stream in streams:
                    stream.cancel()
        elapsed = time.monotonic() - t_start
        log.info("restored %s to %s in %.1fs", human_bytes(size), target_path, elapsed)
        timings = {"restore": elapsed, "fsync": target.fsync_seconds}
        requests = sum(stream.requests for stream in streams)
        return RestoreResult(backup_id, size, len(chain), self.downloaded, written, timings, requests)

    @staticmethod
    def _size(s3: S3Access, item: dict) -> int:
        if item.get("file_size") is not None:
            return int(item["file_size"])
        head = {"VersionId": item["version_id"]} if item.get("version_id") else {}
        return int(s3.call("head_object", Key=item["key"], **head)["ContentLength"])

    def _open(self, s3: S3Access, item: dict, size: int, share: int, pool) -> ObjectStream:
        chunk, ahead = stream_plan(size, share)
        return ObjectStream(s3, item["key"], size, pool, chunk_size=chunk, ahead=ahead, on_bytes=self._count,
                            version_id=item.get("version_id") or None, etag=item.get("etag") or None)  # fmt: skip


def write_disk(layers: list[Layer], chain: ChainReader, allocated: list[int], target: Target, task,
               *, threads: int | None = None) -> int:  # fmt: skip
    """Every block of the disk to the target in order, decompressed on every core; returns bytes written.

    On a file, blocks of zeros are not written: they stay holes. On a
    device every block is written, zeros included.
    """
    block_size = chain.block_size
    bitmap_size = chain.top.bitmap_size
    zero = zeros(block_size)
    writer = _Writer(target)
    threads = threads or workers()
    pool = ThreadPoolExecutor(threads, thread_name_prefix="reclo-unpack")
    queued: deque[tuple[int, int, Future | None]] = deque()  # (index, length, the block or None: zeros)

    def drain(keep: int) -> None:
        while len(queued) > keep:
            index, length, future = queued.popleft()
            data, is_zero = (zero[:length], True) if future is None else future.result()
            if target.is_device or not is_zero:
                writer.put(index * block_size, data)
            task.advance(length)

    try:
        wanted = iter(allocated)
        next_allocated = next(wanted, None)
        for index in range(chain.block_count):
            length = min(block_size, chain.virtual_size - index * block_size)
            if index == next_allocated:
                pieces = [p for layer in reversed(layers) if (p := layer.frames_of(index)) is not None]
                queued.append((index, length, pool.submit(_assemble, index, length, pieces, block_size, bitmap_size)))
                next_allocated = next(wanted, None)
            else:
                queued.append((index, length, None))
            drain(2 * threads)
        drain(0)
    finally:
        for _, _, future in queued:
            if future is not None:
                future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        writer.close()
    return writer.written


def _above(chain: list[dict], ancestor: str, backup_id: str) -> list[dict]:
    """The chain's entries above `ancestor` (which the target holds); UsageError when it is not in the chain."""
    ids = [str(item.get("backup_id") or "") for item in chain]
    wanted = ancestor.lower()
    matches = [
        n
        for n, found in enumerate(ids)
        if found.lower() == wanted or (len(wanted) >= 6 and found.lower().startswith(wanted))
    ]
    if len(matches) != 1:
        raise UsageError(
            f"Restore point {ancestor} is not one that {backup_id} is built on, so the disk holding it cannot be "
            "brought up to date block by block. Restore without --changed-since (the whole disk)."
        )
    above = chain[matches[0] + 1 :]
    if not above:
        raise UsageError(f"{backup_id} is {ancestor} itself: the disk already holds it, nothing to write.")
    return above


def _check_links_above(layers: list[Layer]) -> None:
    """The layers above the ancestor: each differencing, each the parent of the next (as ChainReader checks)."""
    for n, layer in enumerate(layers):
        if layer.reader.info.disk_type != "differencing":
            raise VHDError(f"layer {n} above the earlier restore point is a full VHD, not a differencing one")
        if n and layer.reader.info.parent_unique_id != layers[n - 1].reader.info.unique_id:
            raise VHDError(f"layer {n}'s parent is not the layer below it")
        if layer.reader.virtual_size != layers[0].reader.virtual_size:
            raise VHDError(f"layer {n} has another disk size")


def write_changed(layers: list[Layer], chain: ChainReader, allocated: list[int], target: Target, task,
                  *, threads: int | None = None) -> int:  # fmt: skip
    """Only the blocks the layers store, onto what the target holds; returns bytes written.

    A block whose sectors the layers hold only in part keeps the target's
    other sectors: the target's block is read and stacked under them.
    """
    block_size = chain.block_size
    bitmap_size = chain.top.bitmap_size
    nsect = block_size // 512
    full_bitmap = bytes([0xFF]) * (nsect // 8) + bytes(bitmap_size - nsect // 8)
    writer = _Writer(target)
    threads = threads or workers()
    pool = ThreadPoolExecutor(threads, thread_name_prefix="reclo-unpack")
    queued: deque[tuple[int, Future]] = deque()

    def on_disk(index: int, length: int) -> bytes:
        data = os.pread(target.fd, length, index * block_size)
        return data.ljust(block_size, b"\0")

    def assemble(index: int, length: int, pieces: list) -> Block:
        stored: list[tuple[bytes, bytes | memoryview | Callable[[], bytes]]]
        stored, _ = _stored_blocks(index, pieces, block_size, bitmap_size)
        # What the target holds, as the lowest layer: read only when a sector is still needed.
        stored.append((full_bitmap, lambda: on_disk(index, length)))
        return stack_block(stored, block_size, length)

    def drain(keep: int) -> None:
        while len(queued) > keep:
            index, future = queued.popleft()
            writer.put(index * block_size, future.result())

    advanced = 0
    try:
        for index in allocated:
            length = min(block_size, chain.virtual_size - index * block_size)
            pieces = [p for layer in reversed(layers) if (p := layer.frames_of(index)) is not None]
            # Each block comes once, so its read of the target never meets a write of it.
            queued.append((index, pool.submit(assemble, index, length, pieces)))
            drain(2 * threads)
            task.advance(length)
            advanced += length
        drain(0)
        task.advance(chain.virtual_size - advanced)  # the blocks left as they are count as done
    finally:
        for _, future in queued:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        writer.close()
    return writer.written


def _verify(chain: list[dict], streams: list[ObjectStream], backup_id: str) -> None:
    for item, stream in zip(chain, streams, strict=True):
        digest = stream.sha256_hexdigest()
        expected = (item.get("sha256") or "").lower()
        if expected and digest != expected:
            raise VerificationFailed(
                f"Object {item.get('backup_id') or item['key']} of restore point {backup_id} has SHA-256 {digest}, "
                f"the portal recorded {expected}: the stored data is damaged and the restored disk must not be trusted."
            )
        if item.get("file_size") is not None and stream.size != int(item["file_size"]):
            raise VerificationFailed(f"Object {item['key']} has the wrong size.")
    log.info("all %d objects of the chain match their SHA-256", len(chain))
