"""Materialising a restore point for the local sandbox: a chain's blocks into a sparse raw file."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def write_sparse_raw(blocks: Iterable[tuple[int, bytes]], path: Path, *, size: int, block_size: int) -> int:
    """Write ``(index, data)`` blocks at ``index * block_size`` into a new raw file of ``size`` bytes.

    Blocks that are all zeros, and blocks never given, stay holes (the file
    is truncated to ``size`` first, so they read as zeros and take no
    space). Returns the number of bytes actually written. The file is
    replaced if it exists; it is fsynced, since QEMU opens it next.
    """
    path = Path(path)
    zero = bytes(block_size)
    written = 0
    with open(path, "wb") as f:
        f.truncate(size)
        for index, data in blocks:
            offset = index * block_size
            if offset + len(data) > size or len(data) > block_size:
                raise ValueError(f"block {index} ({len(data)} bytes) does not fit a {size}-byte disk")
            if data == zero[: len(data)]:
                continue
            os.pwrite(f.fileno(), data, offset)
            written += len(data)
        f.flush()
        os.fsync(f.fileno())
    return written


def materialise_chain(chain, path: Path) -> int:
    """The disk a :class:`reclo_agent.vhd.ChainReader` describes, as a sparse raw file at ``path``.

    Reads only the blocks some layer stores (``chain.iter_blocks()``); the
    rest are holes. Returns the bytes written.
    """
    return write_sparse_raw(chain.iter_blocks(), path, size=chain.virtual_size, block_size=chain.block_size)
