"""First pass of a backup: hash every page, decide which blocks to store.

A VHD's block allocation table comes before the data, so the blocks a
restore point holds must be known before the first byte is uploaded. This
pass reads the whole disk once (read ahead by a thread, hashed in the main
thread; SHA-256 releases the GIL), writes the new block map to a pending
file, and compares it with the previous map as it goes:

- full backup: every block that is not all zeros is stored, whole;
- incremental: every block with a changed page is stored, and only the
  changed pages' sectors are set in its bitmap (:meth:`Plan.sector_bitmap`
  re-reads the two maps' digests of that block, so nothing per block but
  its index is kept in memory).

Memory: the read-ahead blocks plus 4 bytes per stored block.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .blockmap import DIGEST_SIZE, DigestReader, changed_pages, page_digests
from .source import Source
from .vhd import make_bitmap
from .vhd.format import DEFAULT_BLOCK_SIZE, SECTOR, bitmap_size

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What the second pass writes; see the module doc."""

    kind: str  # "full" or "incremental"
    virtual_size: int
    page_size: int
    block_size: int
    allocated: array
    pending_map: Path
    old_map: Path | None = None
    changed_bytes: int = 0  # bytes of changed pages (incremental) or of non-zero blocks (full)
    zero_blocks: int = 0
    _readers: tuple | None = field(default=None, repr=False)

    @property
    def pages_per_block(self) -> int:
        return self.block_size // self.page_size

    @property
    def block_count(self) -> int:
        return -(-self.virtual_size // self.block_size)

    @property
    def stored_bytes(self) -> int:
        """Virtual-disk bytes the second pass reads (the allocated blocks)."""
        total = len(self.allocated) * self.block_size
        if self.allocated and self.allocated[-1] == self.block_count - 1:
            total -= self.block_count * self.block_size - self.virtual_size
        return total

    def pages_in(self, index: int) -> int:
        length = min(self.block_size, self.virtual_size - index * self.block_size)
        return -(-length // self.page_size)

    def open(self) -> None:
        """Open the two maps for :meth:`sector_bitmap` (incrementals only)."""
        if self.kind == "incremental" and self._readers is None:
            old, new = open(self.old_map, "rb"), open(self.pending_map, "rb")  # noqa: SIM115 - closed in close()
            self._readers = (old, new, DigestReader(old, self.pages_per_block), DigestReader(new, self.pages_per_block))

    def close(self) -> None:
        if self._readers:
            self._readers[0].close()
            self._readers[1].close()
            self._readers = None

    def sector_bitmap(self, index: int) -> bytes | None:
        """The sector bitmap of stored block ``index``: None (all) for a full backup."""
        if self.kind == "full":
            return None
        self.open()
        pages = self.pages_in(index)
        old = self._readers[2].block(index, pages)
        new = self._readers[3].block(index, pages)
        spp = self.page_size // SECTOR
        last_sectors = (min(self.block_size, self.virtual_size - index * self.block_size) // SECTOR) - (pages - 1) * spp
        runs: list[tuple[int, int]] = []
        for page in changed_pages(old, new):
            count = last_sectors if page == pages - 1 else spp
            start = page * spp
            if runs and sum(runs[-1]) == start:
                runs[-1] = (runs[-1][0], runs[-1][1] + count)
            else:
                runs.append((start, count))
        return make_bitmap(runs, bitmap_size(self.block_size))


def scan(
    source: Source,
    pending_map: Path,
    *,
    page_size: int,
    old_map: Path | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    progress: Callable[[int], None] | None = None,
) -> Plan:
    """Hash ``source`` into ``pending_map``; an incremental plan when ``old_map`` is given."""
    if block_size % page_size or page_size % SECTOR:
        raise ValueError("the page size must divide the block size and be whole sectors")
    kind = "incremental" if old_map is not None else "full"
    plan = Plan(kind, source.size, page_size, block_size, array("I"), pending_map, old_map)
    zero_block = bytes(block_size)
    zero_digests = page_digests(zero_block, page_size)
    old_file = open(old_map, "rb") if old_map else None  # noqa: SIM115 - closed below
    old_reader = DigestReader(old_file, plan.pages_per_block) if old_file else None
    try:
        with open(pending_map, "wb") as out:
            for index, data in source.blocks(block_size):
                is_zero = data == zero_block[: len(data)]
                if is_zero and len(data) == block_size:
                    digests = zero_digests  # no need to hash 2 MiB of zeros
                else:
                    digests = page_digests(data, page_size)
                out.write(digests)
                if is_zero:
                    plan.zero_blocks += 1
                if old_reader is None:
                    if not is_zero:
                        plan.allocated.append(index)
                        plan.changed_bytes += len(data)
                else:
                    pages = len(digests) // DIGEST_SIZE
                    old = old_reader.block(index, pages)
                    if old != digests:
                        plan.allocated.append(index)
                        for page in changed_pages(old, digests):
                            plan.changed_bytes += min(page_size, len(data) - page * page_size)
                if progress:
                    progress(len(data))
            out.flush()
    finally:
        if old_file:
            old_file.close()
    log.info(
        "scanned %s: %d of %d blocks to store (%s), %d all-zero blocks",
        source.path,
        len(plan.allocated),
        plan.block_count,
        "changed pages" if kind == "incremental" else "non-zero",
        plan.zero_blocks,
    )
    return plan
