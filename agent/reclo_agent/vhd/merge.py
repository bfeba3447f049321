"""Merging a chain of restore points into one dynamic VHD."""

from __future__ import annotations

import uuid

from .format import VHDInfo
from .reader import ChainReader
from .streams import Writable
from .writer import VHDWriter


def merge_chain(
    chain: ChainReader,
    out: Writable,
    *,
    unique_id: uuid.UUID | None = None,
    timestamp: int | None = None,
) -> VHDInfo:
    """Write the disk at the top of ``chain`` as one dynamic VHD to ``out``.

        Streams: ``out`` may be non-seekable (e.g. a
        :class:`~reclo_agent.vhd.seekzstd.SeekableZstdWriter`), and memory stays
        at a few blocks and BAT windows whatever the disk size (the allocated
    blocks are walked again rather than kept). Blocks that no layer
        stores stay unallocated; blocks some layer stores are written even if
        they resolve to zeros (finding those would take a second pass).

        The result keeps the top layer's unique id and timestamp unless told
        otherwise, so when retention merges the oldest restore points into the
        base, the next incremental's parent id still names the merged base.
    """
    top = chain.top.info
    writer = VHDWriter(
        out,
        chain.virtual_size,
        chain.allocated_blocks,
        block_size=chain.block_size,
        unique_id=unique_id or top.unique_id,
        timestamp=top.timestamp if timestamp is None else timestamp,
    )
    for index, data in chain.iter_blocks():
        writer.write_block(index, data)
    return writer.close()
