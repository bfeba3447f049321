"""``reclo-agent files`` and ``reclo-agent restore-files``: browse a restore point, take files back.

The portal reads the restore point (in a confined worker process, see the
portal's docs/architecture.md); the agent only asks for listings and
streams the answers. A path is ``PARTITION:/folder/file`` (``2:/home``);
``files BACKUP_ID`` alone lists the partitions.

``restore-files`` writes each path into ``--to DIR`` under its own name: a
file as it is, a folder from the zip the portal streams, which the agent
spools to a temporary file in DIR (a zip's index is at its end) and
unpacks. Modification times are kept, and Unix modes where the file system
has them (ext4, XFS); a file is written to a temporary name and renamed,
so a failed restore never leaves half a file under the real name.
"""

from __future__ import annotations

import os
import shutil
import stat
import struct
import tempfile
import zipfile
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path, PurePosixPath

from .api import PortalClient
from .errors import DiskError, UsageError
from .progress import human_bytes

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Place:
    partition: int | None
    path: str


def parse_place(text: str | None) -> Place:
    """``N:/path`` -> Place(N, "/path"); ``N`` alone is the partition's root; None is the partition list."""
    if text is None:
        return Place(None, "/")
    number, _, path = text.partition(":")
    if not number.isdigit() or int(number) < 1:
        raise UsageError(
            f"{text!r}: give PARTITION:/path, e.g. 1:/home/alice (reclo-agent files BACKUP_ID lists the partitions)."
        )
    path = path or "/"
    if not path.startswith("/"):
        raise UsageError(f"{text!r}: the path must start with / (e.g. {number}:/{path}).")
    return Place(int(number), path)


def listing_lines(body: dict) -> list[str]:
    """A listing as aligned text lines (partitions, or a folder's entries)."""
    if "partitions" in body:
        rows = [("PART", "FILE SYSTEM", "SIZE", "LABEL")]
        rows += [(str(p["partition"]), p["filesystem"], human_bytes(p["size"]), p["label"]) for p in body["partitions"]]
    else:
        rows = [("TYPE", "SIZE", "MODIFIED", "NAME")]
        for e in body["entries"]:
            name = e["name"] + ("/" if e["type"] == "dir" else "")
            size = "-" if e["type"] == "dir" else human_bytes(e["size"])
            rows.append((e["type"], size, e.get("modified") or "-", name))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _extended_mtime(extra: bytes) -> int | None:
    # The zip "UT" extra field (0x5455) holds the Unix modification time; zipfile does not read it.
    at = 0
    while at + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, at)
        if tag == 0x5455 and size >= 5 and extra[at + 4] & 1:
            return struct.unpack_from("<l", extra, at + 5)[0]
        at += 4 + size
    return None


def _inside(root: Path, name: str) -> Path:
    parts = PurePosixPath(name).parts
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts:
        raise DiskError(f"The zip names {name!r}, outside the folder it restores; nothing more was written.")
    return root.joinpath(*parts)


def _unzip(spool, root: Path) -> int:
    """Unpack the portal's zip into ``root``, with times and modes; returns the number of files."""
    count, folders = 0, []
    with zipfile.ZipFile(spool) as zf:
        for info in zf.infolist():
            target = _inside(root, info.filename)
            mode = (info.external_attr >> 16) & 0o7777
            mtime = _extended_mtime(info.extra)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                folders.append((target, mode, mtime))
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
            _set_meta(target, mode or None, mtime)
            count += 1
    for folder, mode, mtime in sorted(folders, key=lambda f: -len(f[0].parts)):
        _set_meta(folder, mode or None, mtime)
    return count


def _set_meta(path: Path, mode: int | None, mtime: float | None) -> None:
    if mode is not None:
        os.chmod(path, stat.S_IMODE(mode))
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def restore_files(client: PortalClient, backup_id: str, places: list[Place], to: str) -> list[dict]:
    """Write each place into the folder ``to``; one ``{path, written, files, bytes}`` per place."""
    root = Path(to)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DiskError(f"Cannot make {to}: {exc.strerror}.") from exc
    done = []
    for place in places:
        if place.partition is None:
            raise UsageError("restore-files needs PARTITION:/path for each path.")
        resp = client.file_content(backup_id, place.partition, place.path)
        with resp:
            is_zip = resp.headers.get("Content-Type", "").startswith("application/zip")
            name = PurePosixPath(place.path).name or f"partition-{place.partition}"
            target = _inside(root, name)
            mode = int(resp.headers["X-File-Mode"], 8) if resp.headers.get("X-File-Mode") else None
            modified = resp.headers.get("Last-Modified")
            mtime = parsedate_to_datetime(modified).timestamp() if modified else None
            try:
                with tempfile.NamedTemporaryFile(dir=root, prefix=".reclo-", delete=False) as tmp:
                    size = 0
                    for chunk in resp.iter_content(CHUNK):
                        tmp.write(chunk)
                        size += len(chunk)
                expected = resp.headers.get("Content-Length")
                if not is_zip and expected is not None and int(expected) != size:
                    raise DiskError(f"{place.path}: the portal sent {size} of {expected} bytes; try again.")
                if is_zip:
                    target.mkdir(exist_ok=True)
                    with open(tmp.name, "rb") as spool:
                        count = _unzip(spool, target)
                    _set_meta(target, mode, mtime)
                else:
                    os.replace(tmp.name, target)
                    _set_meta(target, mode, mtime)
                    count = 1
            except OSError as exc:
                raise DiskError(f"Cannot write {target}: {exc.strerror}.") from exc
            finally:
                if os.path.exists(tmp.name):
                    os.unlink(tmp.name)
        done.append({"path": f"{place.partition}:{place.path}", "written": str(target), "files": count, "bytes": size})
    return done
