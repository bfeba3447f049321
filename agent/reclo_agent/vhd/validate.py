"""Structural validation of an untrusted VHD (the portal's upload verifier)."""

from __future__ import annotations

import uuid

from .errors import VHDError
from .format import VHDInfo
from .reader import VHDReader
from .seekzstd import check_seekable, open_seekable
from .streams import Readable

# The backup kinds of the API and the VHD disk type each must be.
KIND_DISK_TYPES = {"full": "dynamic", "incremental": "differencing"}


def validate(
    fileobj: Readable,
    *,
    expected_kind: str | None = None,
    parent_unique_id: uuid.UUID | None = None,
    virtual_size: int | None = None,
    max_blocks: int | None = None,
) -> VHDInfo:
    """Check a VHD's structure and that it fits what was declared.

    ``fileobj`` is a seekable binary file object (e.g. from
    :func:`~reclo_agent.vhd.seekzstd.open_seekable`). Checks the footer
    (cookie, checksum, version, disk type, size) and for dynamic and
    differencing disks both footer copies, the dynamic header (cookie,
    checksum, block size), the BAT (bounded by the file, every entry inside
    the data area, no two blocks overlapping each other or the metadata) and
    the parent locators. Then: ``expected_kind`` ("full" needs a dynamic VHD,
    "incremental" a differencing one), ``parent_unique_id`` (the parent
    backup's VHD unique id) and ``virtual_size``. ``max_blocks`` refuses a
    header declaring more blocks before its BAT is read (memory is bounded
    either way; this bounds the time a tiny upload can cost).

    Returns the file's :class:`VHDInfo`; raises :class:`VHDError` with a
    human-readable reason for anything malformed or not fitting.
    """
    if expected_kind is not None and expected_kind not in KIND_DISK_TYPES:
        raise ValueError(f"expected_kind must be one of {sorted(KIND_DISK_TYPES)}, not {expected_kind!r}")
    info = VHDReader(fileobj, max_blocks=max_blocks).info
    if expected_kind is not None and info.disk_type != KIND_DISK_TYPES[expected_kind]:
        raise VHDError(
            f"a {expected_kind} backup must be a {KIND_DISK_TYPES[expected_kind]} VHD, this one is {info.disk_type}"
        )
    if parent_unique_id is not None and info.parent_unique_id != parent_unique_id:
        raise VHDError(
            f"parent id {info.parent_unique_id} does not match the parent backup's VHD id {parent_unique_id}"
        )
    if virtual_size is not None and info.virtual_size != virtual_size:
        raise VHDError(f"virtual size {info.virtual_size} does not match the expected {virtual_size}")
    return info


def validate_stored(
    fileobj: Readable,
    *,
    expected_kind: str | None = None,
    parent_unique_id: uuid.UUID | None = None,
    virtual_size: int | None = None,
    max_blocks: int | None = None,
) -> VHDInfo:
    """Verify a stored object (seekable zstd of a VHD) end to end.

    First every frame is decompressed and checked against its checksum and
    the seek table (:func:`~reclo_agent.vhd.seekzstd.check_seekable`), then
    the VHD inside is validated as by :func:`validate`. ``fileobj`` is the
    compressed object (seekable, e.g. a ranged-GET file object); it is read
    once in full. Raises :class:`VHDError` with the reason.
    """
    check_seekable(fileobj)
    return validate(
        open_seekable(fileobj),
        expected_kind=expected_kind,
        parent_unique_id=parent_unique_id,
        virtual_size=virtual_size,
        max_blocks=max_blocks,
    )
