"""Block maps: a hash per page of the disk as it was at the last restore point.

The 2 MiB VHD block is the unit of allocation, not of change. Comparing
page hashes with the map of the previous restore point tells which pages
changed, so an incremental sets only their sectors in a block's bitmap and
zero-fills the rest (which then compresses to nearly nothing). The agent
never downloads anything to make an incremental.

Page size: 4 KiB by default. File systems (ext4, XFS, NTFS) write in 4 KiB
clusters, and scattered 4 KiB writes are the worst case docs/architecture.md measures:
with 16 KiB pages each such write costs 16 KiB of mostly unchanged random
data in the upload (about 4x the changed bytes), with 4 KiB pages it costs
the 4 KiB itself, which is what keeps an incremental within 1.5x of the
changed bytes. The price is the map: 16 bytes per page, 4 MiB per GiB of
disk (0.4%), read and written sequentially, never held in memory.

Hash: SHA-256 truncated to 128 bits. It only detects change (the disk's
owner is the only writer, and 128 bits make an accidental collision
negligible); with the CPU's SHA extensions it is the fastest hash in the
standard library, and its throughput is the ceiling the benchmark compares
with.

Files, per server and disk, under ``<state>/maps/<server>/``:

- ``<disk>.json`` -- what the map describes (:class:`MapMeta`): the restore
  point's backup id, its VHD's unique id, timestamp and file name (an
  incremental's parent locator needs them), the disk size and page size;
- ``<disk>.<backup id>.map`` -- the digests, 16 bytes per page in disk order;
- ``<disk>.<tag>.pending`` -- the digests of a backup in progress.

Commit renames the pending digests to their final name, then replaces the
JSON atomically, then deletes the old digests: a crash at any point leaves
a JSON naming a complete digest file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .fsutil import write_json_atomic
from .vhd.streams import Readable

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 4096
PAGE_SIZES = (4096, 8192, 16384, 32768, 65536)
DIGEST_SIZE = 16
FORMAT = 1
HASH_NAME = "sha256/128"


_ZERO_PAGES: dict[int, tuple[bytes, bytes]] = {}


@functools.lru_cache(maxsize=4)
def zeros(n: int) -> bytes:
    """``n`` zero bytes, made once per size (blocks and pages are compared against them)."""
    return bytes(n)


def page_digests(data, page_size: int) -> bytes:
    """The concatenated 16-byte digests of each page of ``data`` (last may be short).

    All-zero pages (free space) are recognised by a memcmp and get the
    zero page's digest without hashing: several times cheaper than SHA-256,
    and a used disk has many of them.
    """
    if not isinstance(data, bytes):
        data = bytes(data)  # slices of bytes compare by memcmp; memoryviews do not
    if page_size not in _ZERO_PAGES:
        zero = bytes(page_size)
        _ZERO_PAGES[page_size] = (zero, hashlib.sha256(zero).digest()[:DIGEST_SIZE])
    zero, zero_digest = _ZERO_PAGES[page_size]
    if len(data) % page_size == 0 and data == zeros(len(data)):
        return zero_digest * (len(data) // page_size)  # free space: no page to look at
    # startswith compares in place and the view slices copy nothing: only the hashing touches each page.
    sha256, is_zero, view = hashlib.sha256, data.startswith, memoryview(data)
    return b"".join(
        zero_digest if is_zero(zero, at) else sha256(view[at : at + page_size]).digest()[:DIGEST_SIZE]
        for at in range(0, len(data), page_size)
    )


def changed_pages(old: bytes, new: bytes) -> list[int]:
    """Indices of the pages whose digests differ (``old`` and ``new`` equally long)."""
    if len(old) != len(new):
        raise ValueError("digest runs of different lengths")
    return [
        i
        for i, at in enumerate(range(0, len(new), DIGEST_SIZE))
        if old[at : at + DIGEST_SIZE] != new[at : at + DIGEST_SIZE]
    ]


@dataclass
class MapMeta:
    """What a committed block map describes."""

    server: str
    disk: str
    virtual_size: int
    page_size: int
    backup_id: str
    vhd_unique_id: str
    vhd_timestamp: int
    file_name: str
    kind: str = ""
    source: str = ""
    created: str = ""
    digests: str = ""  # file name of the digests, beside the JSON
    format: int = FORMAT
    hash: str = HASH_NAME

    @property
    def page_count(self) -> int:
        return -(-self.virtual_size // self.page_size)


class MapStore:
    """The block maps kept in a state folder."""

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir) / "maps"

    def _dir(self, server: str) -> Path:
        return self.root / server

    def meta_path(self, server: str, disk: str) -> Path:
        return self._dir(server) / f"{disk}.json"

    def load(self, server: str, disk: str) -> tuple[MapMeta | None, str]:
        """``(meta, "")`` for a usable map, else ``(None, why not)``."""
        path = self.meta_path(server, disk)
        if not path.exists():
            return None, "no block map from an earlier backup of this disk"
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            meta = MapMeta(**{k: v for k, v in raw.items() if k in MapMeta.__dataclass_fields__})
        except (OSError, ValueError, TypeError) as exc:
            return None, f"the block map {path} is unreadable ({exc})"
        if meta.format != FORMAT or meta.hash != HASH_NAME:
            return None, "the block map was written by another version of the agent"
        digests = self.digests_path(meta)
        try:
            size = digests.stat().st_size
        except OSError:
            return None, f"the block map's digests {digests} are missing"
        if size != meta.page_count * DIGEST_SIZE:
            return None, f"the block map's digests {digests} are truncated"
        return meta, ""

    def digests_path(self, meta: MapMeta) -> Path:
        return self._dir(meta.server) / meta.digests

    def pending_path(self, server: str, disk: str, tag: str) -> Path:
        self._dir(server).mkdir(parents=True, exist_ok=True, mode=0o700)
        return self._dir(server) / f"{disk}.{tag}.pending"

    def commit(self, pending: Path, meta: MapMeta) -> None:
        """Make ``pending`` the map of ``meta``'s restore point (see the module doc)."""
        old, _ = self.load(meta.server, meta.disk)
        meta.digests = f"{meta.disk}.{meta.backup_id}.map"
        final = self.digests_path(meta)
        if pending.stat().st_size != meta.page_count * DIGEST_SIZE:
            raise ValueError(f"pending block map {pending} has the wrong size")
        os.replace(pending, final)
        write_json_atomic(self.meta_path(meta.server, meta.disk), asdict(meta))
        if old is not None and old.digests != meta.digests:
            try:
                self.digests_path(old).unlink()
            except OSError:
                pass
        log.debug("block map of %s/%s now describes backup %s", meta.server, meta.disk, meta.backup_id)

    def forget(self, server: str, disk: str) -> None:
        """Drop the map of a disk (the next backup is full)."""
        meta, _ = self.load(server, disk)
        if meta is not None:
            self.digests_path(meta).unlink(missing_ok=True)
        self.meta_path(server, disk).unlink(missing_ok=True)

    def all(self) -> list[MapMeta]:
        """Every usable map, for ``status`` and ``schedule``."""
        found = []
        if self.root.is_dir():
            for path in sorted(self.root.glob("*/*.json")):
                meta, _ = self.load(path.parent.name, path.stem)
                if meta is not None:
                    found.append(meta)
        return found


class DigestReader:
    """Random access to the digests of one block at a time in a map file."""

    def __init__(self, f: Readable, pages_per_block: int) -> None:
        self._f = f
        self._stride = pages_per_block * DIGEST_SIZE

    def block(self, index: int, pages: int) -> bytes:
        """The digests of the first ``pages`` pages of block ``index``."""
        self._f.seek(index * self._stride)
        want = pages * DIGEST_SIZE
        data = self._f.read(want)
        if data is None or len(data) != want:
            raise ValueError(f"block map ends inside block {index}")
        return data
