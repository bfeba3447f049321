"""The agent's record of an upload in progress, so a killed run can resume it.

Per server and disk, under ``<state>/uploads/<server>/``:

- ``<disk>.json`` -- the upload: the portal's upload id and object key, the
  S3 multipart ``UploadId``, what the restore point is (kind, parent, VHD
  unique id and timestamp, file name) and the part size. Rewritten
  atomically when it changes (a handful of times per backup);
- ``<disk>.parts`` -- one JSON line per part S3 has acknowledged: number,
  ETag, SHA-256 and size. Appended and fsync'ed as each part completes, so
  the journal costs the same per part whatever the number of parts.

Temporary credentials are never stored: a resumed run asks the portal for
fresh ones. The state folder also holds the lock that keeps two backups
(say, a scheduled one and a manual one) from running at once.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import Busy, UsageError
from .fsutil import STATE_DIR_MODE, write_json_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartRecord:
    number: int
    etag: str
    sha256: str  # hex
    size: int


@dataclass
class UploadRecord:
    """What ``<disk>.json`` holds: one upload, from the portal's grant to the verdict."""

    upload_id: str
    key: str
    bucket: str
    kind: str  # "full" or "incremental"
    file_name: str
    virtual_size: int
    page_size: int
    vhd_unique_id: str  # recorded so a resumed run regenerates the same stream
    vhd_timestamp: int
    phase: str = "uploading"  # then "uploaded" (multipart completed), "completed" (portal told)
    region: str | None = None
    endpoint_url: str | None = None
    parent_id: str | None = None
    source: str = ""
    consistency: str = "crash"
    started: str = ""
    multipart_id: str | None = None
    part_size: int | None = None
    # Known once the stream is stored:
    file_size: int | None = None
    sha256: str | None = None
    part_count: int | None = None  # parts 1..part_count of the journal make the object
    pending_map: str | None = None
    changed_bytes: int = 0
    backup_id: str | None = None  # once the portal took the complete

    @classmethod
    def from_json(cls, data: dict) -> UploadRecord:
        """The record from its JSON (unknown keys ignored; TypeError when one it needs is missing)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class UploadState:
    """One resumable upload (see the module doc): its :class:`UploadRecord` and its journal of parts."""

    def __init__(self, root: Path, server: str, disk: str, record: UploadRecord) -> None:
        self.dir = root / "uploads" / server
        self.json_path = self.dir / f"{disk}.json"
        self.parts_path = self.dir / f"{disk}.parts"
        self.record = record
        self.parts: dict[int, PartRecord] = {}
        self._lock = threading.Lock()

    @classmethod
    def load(cls, root: Path, server: str, disk: str) -> UploadState | None:
        json_path = root / "uploads" / server / f"{disk}.json"
        try:
            record = UploadRecord.from_json(json.loads(json_path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            log.warning("ignoring the unreadable upload record %s (%s)", json_path, exc)
            return None
        state = cls(root, server, disk, record)
        try:
            with open(state.parts_path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = PartRecord(**json.loads(line))
                    except (ValueError, TypeError):
                        continue  # a line cut short by a kill: that part is simply sent again
                    state.parts[rec.number] = rec
        except FileNotFoundError:
            pass
        return state

    def save(self, **changes) -> None:
        """Change fields of the record and write it (atomically)."""
        for name, value in changes.items():
            if not hasattr(self.record, name):
                raise AttributeError(f"UploadRecord has no field {name!r}")
            setattr(self.record, name, value)
        write_json_atomic(self.json_path, asdict(self.record))

    def part_checksums(self) -> list[str]:
        """Hex SHA-256 of parts 1..part_count, as S3 acknowledged them (the journal)."""
        count = self.record.part_count or 0
        return [self.parts[n].sha256 for n in range(1, count + 1) if n in self.parts]

    def record_part(self, rec: PartRecord) -> None:
        """Journal an acknowledged part (thread-safe, durable before returning)."""
        line = json.dumps(rec.__dict__, separators=(",", ":")) + "\n"
        with self._lock:
            self.parts[rec.number] = rec
            self.dir.mkdir(parents=True, exist_ok=True, mode=STATE_DIR_MODE)
            with open(self.parts_path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())

    def reset_parts(self) -> None:
        """Forget every part (a new multipart upload starts from nothing)."""
        with self._lock:
            self.parts.clear()
            self.parts_path.unlink(missing_ok=True)

    def discard(self) -> None:
        self.parts.clear()
        self.parts_path.unlink(missing_ok=True)
        self.json_path.unlink(missing_ok=True)

    @staticmethod
    def all(root: Path) -> list[tuple[str, str, dict]]:
        """``(server, disk, data)`` of every upload record, for ``status``."""
        found = []
        base = root / "uploads"
        if base.is_dir():
            for path in sorted(base.glob("*/*.json")):
                try:
                    found.append((path.parent.name, path.stem, json.loads(path.read_text(encoding="utf-8"))))
                except (OSError, ValueError):
                    continue
        return found


class StateLock:
    """An exclusive lock on the state folder, held for a whole backup run."""

    def __init__(self, root: Path) -> None:
        self.path = root / "agent.lock"
        self._fd = -1

    def __enter__(self) -> StateLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=STATE_DIR_MODE)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise UsageError(f"Cannot use the state folder {self.path.parent}: {exc.strerror}.") from exc
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            raise Busy(
                f"Another reclo-agent backup is running (pid {holder}); wait for it to finish. (Lock: {self.path})"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing releases the flock
            self._fd = -1
