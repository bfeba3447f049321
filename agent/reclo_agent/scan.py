"""The one pass of a backup: read each block once, hash, decide, compress.

Every block of the disk is read once (read ahead by a thread,
:meth:`~reclo_agent.source.Source.blocks`) and handed to a pool of threads
(SHA-256 and zstd release the GIL, so they run on every core), which for
each block

- hashes its pages (the new block map, :mod:`.blockmap`);
- decides whether the restore point stores it: for a full backup every
  block that is not all zeros, whole; for an incremental every block with
  a changed page (against the previous map), with only the changed pages'
  sectors set in its bitmap;
- and, for a block stored, builds and compresses it (``pack``): one
  independent zstd frame.

Results come back in block order (:class:`Scan` is an iterator of
:class:`Block`), the digests go to the pending map in order, and the caller
appends the frames to the stored object. The VHD's BAT goes after the data
(:mod:`.vhd.writer`), so nothing needs to be known before the first block.

Memory: the read-ahead blocks plus ``depth`` blocks in the pool, each with
its compressed frame; nothing grows with the disk.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .blockmap import DIGEST_SIZE, DigestReader, changed_pages, page_digests
from .source import Source
from .vhd import ParentInfo, SeekableZstdWriter, VHDWriter, make_bitmap
from .vhd.format import DEFAULT_BLOCK_SIZE, SECTOR, bitmap_size
from .vhd.seekzstd import DEFAULT_LEVEL, compress_frame

log = logging.getLogger(__name__)

# pack(index, data, sectors) -> the block's compressed frame
Pack = Callable[[int, bytes, "bytes | None"], bytes]


def workers() -> int:
    """Threads hashing and compressing: one per core the process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class Block:
    """One block of the disk, decided."""

    index: int
    length: int  # bytes of the disk in it (the last block may be short)
    store: bool
    sectors: bytes | None = None  # the sector bitmap of a stored incremental block; None: all
    frame: bytes | None = None  # the compressed stored block, when ``pack`` was given
    changed: int = 0  # bytes of changed pages (incremental) or the block's bytes (full, non-zero)
    zero: bool = False
    data: bytes | None = None  # the block as read, when ``keep_data`` (tests, no ``pack``)


class Scan:
    """Iterate over every block of ``source`` in order, decided (see the module doc).

    Writes the new block map to ``pending_map``; ``old_map`` makes it an
    incremental. Counts: :attr:`stored_blocks`, :attr:`changed_bytes`,
    :attr:`zero_blocks`, once iterated.
    """

    def __init__(
        self,
        source: Source,
        pending_map: Path,
        *,
        page_size: int,
        old_map: Path | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        pack: Pack | None = None,
        threads: int | None = None,
        keep_data: bool = False,
    ) -> None:
        if block_size % page_size or page_size % SECTOR:
            raise ValueError("the page size must divide the block size and be whole sectors")
        self.source = source
        self.pending_map = Path(pending_map)
        self.old_map = Path(old_map) if old_map else None
        self.kind = "incremental" if old_map is not None else "full"
        self.page_size = page_size
        self.block_size = block_size
        self.virtual_size = source.size
        self.block_count = -(-source.size // block_size)
        self._pack = pack
        self._threads = threads or workers()
        self._keep = keep_data
        self._zero = bytes(block_size)
        self._zero_digests = page_digests(self._zero, page_size)
        self._bitmap_bytes = bitmap_size(block_size)
        self.stored_blocks = 0
        self.changed_bytes = 0
        self.zero_blocks = 0

    def __iter__(self) -> Iterator[Block]:
        depth = 2 * self._threads  # blocks in the pool: enough to keep every thread busy
        old_file = open(self.old_map, "rb") if self.old_map else None  # noqa: SIM115 - closed below
        old = DigestReader(old_file, self.block_size // self.page_size) if old_file else None
        pool = ThreadPoolExecutor(self._threads, thread_name_prefix="reclo-pack")
        queued: deque[Future] = deque()
        try:
            with open(self.pending_map, "wb") as out:
                for index, data in self.source.blocks(self.block_size):
                    old_digests = old.block(index, -(-len(data) // self.page_size)) if old else None
                    queued.append(pool.submit(self._decide, index, data, old_digests))
                    while len(queued) >= depth:
                        yield self._take(queued.popleft(), out)
                while queued:
                    yield self._take(queued.popleft(), out)
        finally:
            for future in queued:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            if old_file:
                old_file.close()
        log.info(
            "read %s: %d of %d blocks stored (%s), %d all-zero blocks",
            self.source.path,
            self.stored_blocks,
            self.block_count,
            "changed pages" if self.kind == "incremental" else "non-zero",
            self.zero_blocks,
        )

    def _take(self, future: Future, out) -> Block:
        block, digests = future.result()
        out.write(digests)
        self.stored_blocks += block.store
        self.changed_bytes += block.changed
        self.zero_blocks += block.zero
        return block

    # --- in the pool's threads ---------------------------------------------------------

    def _decide(self, index: int, data: bytes, old: bytes | None) -> tuple[Block, bytes]:
        zero = data == self._zero[: len(data)]
        if zero and len(data) == self.block_size:
            digests = self._zero_digests  # no need to hash 2 MiB of zeros
        else:
            digests = page_digests(data, self.page_size)
        block = Block(index, len(data), store=False, zero=zero)
        if old is None:
            if not zero:
                block.store, block.changed = True, len(data)
        elif old != digests:
            block.store = True
            block.sectors, block.changed = self._changed_sectors(old, digests, len(data))
        if block.store:
            if self._pack is not None:
                block.frame = self._pack(index, data, block.sectors)
            if self._keep:
                block.data = data
        return block, digests

    def _changed_sectors(self, old: bytes, new: bytes, length: int) -> tuple[bytes, int]:
        """The sector bitmap of the changed pages of a block, and their bytes."""
        pages = len(new) // DIGEST_SIZE
        spp = self.page_size // SECTOR
        last_sectors = length // SECTOR - (pages - 1) * spp
        runs: list[tuple[int, int]] = []
        changed = 0
        for page in changed_pages(old, new):
            count = last_sectors if page == pages - 1 else spp
            changed += count * SECTOR
            start = page * spp
            if runs and sum(runs[-1]) == start:
                runs[-1] = (runs[-1][0], runs[-1][1] + count)
            else:
                runs.append((start, count))
        return make_bitmap(runs, self._bitmap_bytes), changed


def pack(
    source: Source,
    out,
    pending_map: Path,
    *,
    page_size: int,
    unique_id,
    timestamp: int,
    parent: ParentInfo | None = None,
    old_map: Path | None = None,
    on_block: Callable[[int, int], None] | None = None,
) -> tuple[Scan, tuple[int, str]]:
    """The one pass into a stored restore point: ``source`` as seekable zstd of a VHD, into ``out``.

    A dynamic VHD, or a differencing one on ``parent`` with ``old_map``
    (the parent's block map), BAT after the data. ``on_block(stream bytes,
    disk bytes)`` after each block: how much of the stream holds how much
    of the disk. Returns the pass (its counts) and the stored object's
    (size, SHA-256).
    """
    zstd = SeekableZstdWriter(out, level=DEFAULT_LEVEL)
    writer = VHDWriter(zstd, source.size, None, parent=parent, block_size=DEFAULT_BLOCK_SIZE,
                       unique_id=unique_id, timestamp=timestamp)  # fmt: skip

    def compress(index: int, data: bytes, sectors: bytes | None) -> bytes:  # in the pool's threads
        return compress_frame(writer.block_payload(index, data, sectors), DEFAULT_LEVEL)

    scan = Scan(source, pending_map, page_size=page_size, old_map=old_map, pack=compress)
    for block in scan:
        if block.store:
            assert block.frame is not None, "a stored block was compressed"
            writer.add_compressed_block(block.index, block.frame)
        if on_block:
            on_block(zstd.compressed_size, block.index * DEFAULT_BLOCK_SIZE + block.length)
    writer.close()
    zstd.close()
    return scan, (zstd.compressed_size, zstd.sha256())
