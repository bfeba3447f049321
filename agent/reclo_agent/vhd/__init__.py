"""VHD restore points: write, read, validate, merge and store them.

A restore point is a VHD (Microsoft's "Virtual Hard Disk Image Format
Specification" 1.0): a full backup is a dynamic VHD, an incremental one a
differencing VHD whose parent is the previous restore point. It is stored as
seekable zstd, one frame per VHD block.

This is hand-written because no maintained Python library writes VHDs
(libvhdi, used by the tests as an independent second reader, only reads;
qemu-img writes fixed and dynamic ones but is a separate tool and cannot
make differencing VHDs from a sector mask). Modules:

- :mod:`.format` -- footer and header structures, checksums, CHS geometry;
- :mod:`.bitmap` -- MSB-first sector bitmaps as runs of sectors;
- :mod:`.writer` -- streaming writers (dynamic, differencing, fixed);
- :mod:`.reader` -- reading one VHD or a differencing chain;
- :mod:`.validate` -- checking an untrusted upload;
- :mod:`.merge` -- collapsing a chain into one dynamic VHD;
- :mod:`.seekzstd` -- the seekable zstd storage format.

Typical uses::

    # Agent, full backup of a raw image, compressed while it uploads:
    with SeekableZstdWriter(upload) as stored:
        info = write_dynamic_from_raw(disk, stored)
    file_size, sha256 = stored.compressed_size, stored.sha256()

    # Agent, incremental: blocks with changed pages, a sector bitmap each.
    with SeekableZstdWriter(upload) as stored:
        writer = VHDWriter(stored, size, changed, parent=parent_info.as_parent(name))
        for index in sorted(changed):
            writer.write_block(index, block_bytes(index), make_bitmap(runs[index], 512))
        info = writer.close()

    # Portal verifier (file object over the stored object):
    info = validate_stored(obj, expected_kind="incremental",
                           parent_unique_id=parent_id, virtual_size=size)

    # Restore / consolidation: read or merge a chain of stored objects.
    chain = open_chain([open_seekable(obj) for obj in objects])
    for index, data in chain.iter_blocks(): ...
    merge_chain(chain, out)
"""

from .bitmap import make_bitmap, set_runs
from .errors import VHDError
from .format import DEFAULT_BLOCK_SIZE, ParentInfo, VHDInfo, chs_geometry
from .merge import merge_chain
from .reader import ChainReader, VHDReader, open_chain
from .seekzstd import (
    SeekableReader,
    SeekableZstdWriter,
    SeekTable,
    Stored,
    check_seekable,
    compress_seekable,
    decompress_frame,
    open_seekable,
    read_seek_table,
)
from .validate import validate, validate_stored
from .writer import VHDWriter, scan_allocated, write_dynamic_from_raw, write_fixed

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "ChainReader",
    "ParentInfo",
    "SeekableReader",
    "SeekTable",
    "SeekableZstdWriter",
    "Stored",
    "VHDError",
    "VHDInfo",
    "VHDReader",
    "VHDWriter",
    "check_seekable",
    "chs_geometry",
    "compress_seekable",
    "decompress_frame",
    "make_bitmap",
    "merge_chain",
    "open_chain",
    "open_seekable",
    "read_seek_table",
    "scan_allocated",
    "set_runs",
    "validate",
    "validate_stored",
    "write_dynamic_from_raw",
    "write_fixed",
]
