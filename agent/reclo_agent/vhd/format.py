"""On-disk structures of the VHD format.

Field layouts, constants and algorithms follow Microsoft's "Virtual Hard Disk
Image Format Specification" (version 1.0). Everything on disk is big-endian.
This module only packs and unpacks the footer and the dynamic disk header and
checks what can be checked on one structure alone (cookie, checksum,
version); how the structures fit together is checked in :mod:`.reader`.
"""

from __future__ import annotations

import struct
import time
import uuid
from dataclasses import dataclass, field
from enum import IntEnum

from .errors import VHDError

SECTOR = 512
FOOTER_SIZE = 512
HEADER_SIZE = 1024
DEFAULT_BLOCK_SIZE = 2 * 1024 * 1024
# Sane block sizes: Hyper-V uses 2 MiB (and 512 KiB for some differencing
# disks). The upper bound keeps one block comfortably in memory.
MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 64 * 1024 * 1024
# The largest disk the VHD format supports (per the specification).
MAX_VIRTUAL_SIZE = 2040 * 1024**3

UNALLOCATED = 0xFFFFFFFF  # BAT entry of a block that is not in the file
NO_OFFSET = 0xFFFFFFFFFFFFFFFF  # "data offset" of a fixed disk
FOOTER_COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"
FORMAT_VERSION = 0x00010000
HEADER_VERSION = 0x00010000
FEATURES_RESERVED = 0x00000002  # the VHD specification's "reserved" feature bit, always set
# We write what Hyper-V writes. The creator application matters: readers such
# as qemu trust the exact current size only for known creators like "win ";
# for others they use the rounded-down CHS geometry and cut the disk short.
CREATOR_APP = b"win "
CREATOR_VERSION = 0x000A0000
CREATOR_HOST_OS = b"Wi2k"

# Parent locator platform codes: Windows absolute / relative path, UTF-16LE.
PLATFORM_W2KU = b"W2ku"
PLATFORM_W2RU = b"W2ru"
PLATFORM_NONE = b"\0\0\0\0"

NIL_UUID = uuid.UUID(int=0)  # the parent id of a disk without a parent

# Timestamps count seconds since 2000-01-01 00:00:00 UTC.
VHD_EPOCH = 946684800


class DiskType(IntEnum):
    FIXED = 2
    DYNAMIC = 3
    DIFFERENCING = 4


DISK_TYPE_NAMES = {
    DiskType.FIXED: "fixed",
    DiskType.DYNAMIC: "dynamic",
    DiskType.DIFFERENCING: "differencing",
}


def vhd_timestamp(unix_time: float | None = None) -> int:
    """Seconds since the VHD epoch (2000-01-01 UTC) for a Unix time (or now)."""
    if unix_time is None:
        unix_time = time.time()
    return max(0, int(unix_time) - VHD_EPOCH) & 0xFFFFFFFF


def checksum(data: bytes | bytearray) -> int:
    """One's complement of the byte sum (the checksum field itself zeroed)."""
    return ~sum(data) & 0xFFFFFFFF


def chs_geometry(size: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) for a disk size, per the VHD specification.

    This is the algorithm of the specification's appendix, integer division
    included. The geometry covers at most ``size`` (usually a little less),
    which is why the exact size must also be written in the footer.
    """
    total = min(size // SECTOR, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cyl_x_heads = total // spt
    else:
        spt = 17
        cyl_x_heads = total // spt
        heads = max((cyl_x_heads + 1023) // 1024, 4)
        if cyl_x_heads >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cyl_x_heads = total // spt
        if cyl_x_heads >= heads * 1024:
            spt, heads = 63, 16
            cyl_x_heads = total // spt
    return cyl_x_heads // heads, heads, spt


def bitmap_size(block_size: int) -> int:
    """Bytes of a block's sector bitmap: one bit per sector, padded to a sector."""
    nbytes = -(-(block_size // SECTOR) // 8)
    return -(-nbytes // SECTOR) * SECTOR


def _check_cookie_and_checksum(raw: bytes, cookie: bytes, csum_at: int, what: str) -> None:
    if raw[: len(cookie)] != cookie:
        raise VHDError(f"{what}: bad cookie {raw[: len(cookie)]!r}, expected {cookie!r}")
    stored = int.from_bytes(raw[csum_at : csum_at + 4], "big")
    computed = checksum(raw[:csum_at] + raw[csum_at + 4 :])
    if stored != computed:
        raise VHDError(f"{what}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")


# cookie, features, format version, data offset, timestamp, creator app,
# creator version, creator OS, original size, current size, cylinders, heads,
# sectors per track, disk type, checksum, unique id, saved state, reserved.
_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427x")
_FOOTER_CHECKSUM_AT = 64


@dataclass(frozen=True)
class Footer:
    """The 512-byte hard disk footer (at the end of every VHD)."""

    disk_type: int
    current_size: int
    unique_id: uuid.UUID
    timestamp: int
    data_offset: int
    original_size: int | None = None  # defaults to current_size
    geometry: tuple[int, int, int] | None = None  # defaults to chs_geometry()
    creator_app: bytes = CREATOR_APP
    creator_version: int = CREATOR_VERSION
    creator_host_os: bytes = CREATOR_HOST_OS
    features: int = FEATURES_RESERVED
    format_version: int = FORMAT_VERSION
    saved_state: int = 0

    def pack(self) -> bytes:
        original = self.current_size if self.original_size is None else self.original_size
        cyl, heads, spt = self.geometry or chs_geometry(self.current_size)
        raw = bytearray(
            _FOOTER.pack(
                FOOTER_COOKIE,
                self.features,
                self.format_version,
                self.data_offset,
                self.timestamp,
                self.creator_app,
                self.creator_version,
                self.creator_host_os,
                original,
                self.current_size,
                cyl,
                heads,
                spt,
                self.disk_type,
                0,
                self.unique_id.bytes,
                self.saved_state,
            )
        )
        raw[_FOOTER_CHECKSUM_AT : _FOOTER_CHECKSUM_AT + 4] = checksum(raw).to_bytes(4, "big")
        return bytes(raw)

    @classmethod
    def unpack(cls, raw: bytes, what: str = "footer") -> Footer:
        if len(raw) != FOOTER_SIZE:
            raise VHDError(f"{what}: truncated ({len(raw)} of {FOOTER_SIZE} bytes)")
        _check_cookie_and_checksum(raw, FOOTER_COOKIE, _FOOTER_CHECKSUM_AT, what)
        (
            _,
            features,
            version,
            data_offset,
            timestamp,
            app,
            app_version,
            host_os,
            original,
            current,
            cyl,
            heads,
            spt,
            disk_type,
            _,
            uid,
            saved,
        ) = _FOOTER.unpack(raw)
        if version >> 16 != 1:
            raise VHDError(f"{what}: unsupported file format version {version:#010x}")
        return cls(
            disk_type=disk_type,
            current_size=current,
            unique_id=uuid.UUID(bytes=uid),
            timestamp=timestamp,
            data_offset=data_offset,
            original_size=original,
            geometry=(cyl, heads, spt),
            creator_app=app,
            creator_version=app_version,
            creator_host_os=host_os,
            features=features,
            format_version=version,
            saved_state=saved,
        )


# code, data space, data length, reserved, data offset
_LOCATOR = struct.Struct(">4sIII Q")


@dataclass(frozen=True)
class ParentLocator:
    """One of the eight parent locator entries of a differencing header.

    ``data_space`` is written in bytes (a multiple of 512), as Windows does,
    although the specification says sectors; readers accept both.
    """

    code: bytes
    data_space: int
    data_length: int
    data_offset: int


_EMPTY_LOCATOR = ParentLocator(PLATFORM_NONE, 0, 0, 0)

# cookie, data offset, table offset, header version, max table entries,
# block size, checksum, parent unique id, parent timestamp, reserved,
# parent unicode name, 8 parent locators, reserved.
_HEADER = struct.Struct(">8sQQIII I 16s I 4x 512s 192s 256x")
_HEADER_CHECKSUM_AT = 36
PARENT_NAME_BYTES = 512


@dataclass(frozen=True)
class DynamicHeader:
    """The 1024-byte dynamic disk header of dynamic and differencing VHDs."""

    table_offset: int
    max_table_entries: int
    block_size: int
    parent_unique_id: uuid.UUID = NIL_UUID
    parent_timestamp: int = 0
    parent_name: str = ""
    locators: tuple[ParentLocator, ...] = field(default_factory=tuple)
    data_offset: int = NO_OFFSET
    header_version: int = HEADER_VERSION

    def pack(self) -> bytes:
        name = self.parent_name.encode("utf-16-be")
        if len(name) > PARENT_NAME_BYTES:
            raise ValueError(f"parent name too long for the VHD header: {self.parent_name!r}")
        if len(self.locators) > 8:
            raise ValueError("a VHD header holds at most 8 parent locators")
        locators = list(self.locators) + [_EMPTY_LOCATOR] * (8 - len(self.locators))
        packed_locators = b"".join(
            _LOCATOR.pack(loc.code, loc.data_space, loc.data_length, 0, loc.data_offset) for loc in locators
        )
        raw = bytearray(
            _HEADER.pack(
                HEADER_COOKIE,
                self.data_offset,
                self.table_offset,
                self.header_version,
                self.max_table_entries,
                self.block_size,
                0,
                self.parent_unique_id.bytes,
                self.parent_timestamp,
                name,
                packed_locators,
            )
        )
        raw[_HEADER_CHECKSUM_AT : _HEADER_CHECKSUM_AT + 4] = checksum(raw).to_bytes(4, "big")
        return bytes(raw)

    @classmethod
    def unpack(cls, raw: bytes) -> DynamicHeader:
        what = "dynamic disk header"
        if len(raw) != HEADER_SIZE:
            raise VHDError(f"{what}: truncated ({len(raw)} of {HEADER_SIZE} bytes)")
        _check_cookie_and_checksum(raw, HEADER_COOKIE, _HEADER_CHECKSUM_AT, what)
        (
            _,
            data_offset,
            table_offset,
            version,
            entries,
            block_size,
            _,
            parent_uid,
            parent_ts,
            name,
            packed_locators,
        ) = _HEADER.unpack(raw)
        if version != HEADER_VERSION:
            raise VHDError(f"{what}: unsupported header version {version:#010x}")
        locators = tuple(
            ParentLocator(code, space, length, offset)
            for code, space, length, _, offset in _LOCATOR.iter_unpack(packed_locators)
        )
        return cls(
            table_offset=table_offset,
            max_table_entries=entries,
            block_size=block_size,
            parent_unique_id=uuid.UUID(bytes=parent_uid),
            parent_timestamp=parent_ts,
            parent_name=_decode_name(name),
            locators=locators,
            data_offset=data_offset,
            header_version=version,
        )


def _decode_name(raw: bytes) -> str:
    """The UTF-16BE parent name, up to its first NUL character."""
    text = raw.decode("utf-16-be", errors="replace")
    return text.split("\0", 1)[0]


@dataclass(frozen=True)
class ParentInfo:
    """What a differencing VHD records about its parent.

    ``unique_id`` and ``timestamp`` are the parent footer's; ``file_name`` is
    the parent's file name (written in the header and both locators).
    """

    unique_id: uuid.UUID
    timestamp: int
    file_name: str


@dataclass(frozen=True)
class VHDInfo:
    """Summary of a VHD file, as returned by the validator and the writer."""

    disk_type: str  # "fixed", "dynamic" or "differencing"
    unique_id: uuid.UUID
    virtual_size: int
    block_size: int | None  # None for a fixed VHD
    allocated_blocks: int
    timestamp: int  # footer timestamp, seconds since 2000-01-01 UTC
    file_size: int
    parent_unique_id: uuid.UUID | None = None
    parent_timestamp: int | None = None
    parent_name: str | None = None

    @property
    def kind(self) -> str | None:
        """The backup kind this VHD can be: "full", "incremental" or None."""
        return {"dynamic": "full", "differencing": "incremental"}.get(self.disk_type)

    def as_parent(self, file_name: str) -> ParentInfo:
        """What a differencing VHD on top of this one must record about it."""
        return ParentInfo(self.unique_id, self.timestamp, file_name)
