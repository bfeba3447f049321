"""The file system reader that runs in a sandboxed child of the worker.

Reading a customer's image means running file system code over bytes
anyone with the server's token could have shaped, so it never runs in the
web or worker process itself. ``backups.services.files`` starts
``python -m backups.fsparse FD`` with no credentials in its environment; the
child first drops what it may do (no network where the kernel lets it make
an empty network namespace, a memory and CPU ceiling, no files written, no
new processes), then reads one JSON command from stdin and writes its
answer to stdout. Every byte of the disk it sees comes from its parent over
the socket FD, which reads the chain (see ``services/files.py``): the child
itself can reach nothing.

Libraries (measured for issue 18, see docs/architecture.md "Files in a
restore point"): The Sleuth Kit 4.15 through pytsk3 reads MBR and GPT
partition tables, ext2/3/4, NTFS, FAT12/16/32 and exFAT; it has no XFS, so
XFS comes from dissect.xfs (pure Python). No file system parsing is done
here by hand. This module imports no Django: it runs with the standard
library, pytsk3 and dissect only.

Commands (one JSON line on stdin):
  {"op": "partitions"}
  {"op": "list", "partition": N, "path": "/dir"}
  {"op": "read", "partition": N, "path": "/dir/file"}   a file, or a folder as a zip
Answer on stdout: one JSON line, then (``read`` only) the bytes. On failure
stderr's last line is ``{"code": 314|315, "message": ...}`` and the exit
status is 3.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import posixpath
import resource
import socket
import stat
import struct
import sys
import time
import zipfile
from collections import OrderedDict
from datetime import UTC, datetime

NO_SUCH_PATH = 314
UNREADABLE = 315

# One disk read request: offset (u64) and length (u32); the answer: u32 length then the bytes.
REQUEST = struct.Struct("<QI")
ANSWER = struct.Struct("<I")
MAX_READ = 8 * 1024 * 1024

CHUNK = 1024 * 1024  # the child's read cache works in aligned chunks of this size...
CACHE_CHUNKS = 48  # ...and keeps this many (48 MiB)
OUT_CHUNK = 1024 * 1024

MEMORY_LIMIT = 1024 * 1024 * 1024  # address space; pytsk3 and Python need ~150 MiB
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000


class ParseError(Exception):
    """An answer for the parent: 314 (no such partition or path) or 315 (cannot read)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --- the sandbox ---------------------------------------------------------------------------------


def confine(cpu_seconds: int) -> dict:
    """Drop what this process may do; say which limits took hold.

    An empty network namespace needs root or unprivileged user namespaces;
    where neither is allowed the child still holds no credentials and only
    its parent's socket.
    """
    isolated = False
    libc = ctypes.CDLL(None, use_errno=True)
    for flags in (CLONE_NEWNET, CLONE_NEWUSER | CLONE_NEWNET):
        if libc.unshare(flags) == 0:
            isolated = True
            break
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    return {"network_isolated": isolated, "memory_limit": MEMORY_LIMIT, "cpu_seconds": cpu_seconds}


class RemoteDisk:
    """The disk, read from the parent over a socket, with an LRU cache of aligned chunks."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.size = self._ask(0, 0, header=True)
        self._cache: OrderedDict[int, bytes] = OrderedDict()

    def _recv(self, n: int) -> bytes:
        parts, left = [], n
        while left:
            part = self._sock.recv(min(left, 1 << 20))
            if not part:
                raise ParseError(UNREADABLE, "the restore point could not be read to the end")
            parts.append(part)
            left -= len(part)
        return b"".join(parts)

    def _ask(self, offset: int, length: int, *, header: bool = False):
        self._sock.sendall(REQUEST.pack(offset, length))
        (n,) = ANSWER.unpack(self._recv(ANSWER.size))
        if header:  # request (0, 0) answers the disk's size in a u64
            return struct.unpack("<Q", self._recv(8))[0]
        if n == 0xFFFFFFFF:
            raise ParseError(UNREADABLE, "the restore point could not be read")
        return self._recv(n)

    def _chunk(self, index: int) -> bytes:
        data = self._cache.get(index)
        if data is None:
            start = index * CHUNK
            data = self._ask(start, min(CHUNK, max(0, self.size - start)))
            self._cache[index] = data
            if len(self._cache) > CACHE_CHUNKS:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(index)
        return data

    def read(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        parts = []
        while offset < end:
            index, within = divmod(offset, CHUNK)
            chunk = self._chunk(index)
            part = chunk[within : within + end - offset]
            if not part:
                break
            parts.append(part)
            offset += len(part)
        return b"".join(parts)


class Slice(io.RawIOBase):
    """A seekable file object over ``[offset, offset + size)`` of the disk (for dissect)."""

    def __init__(self, disk: RemoteDisk, offset: int, size: int) -> None:
        super().__init__()
        self._disk, self._offset, self._size, self._pos = disk, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._size - self._pos))
        data = self._disk.read(self._offset + self._pos, n)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)


# --- partitions ---------------------------------------------------------------------------------


def _tsk():
    import pytsk3

    return pytsk3


class _Image:
    """pytsk3's image over the remote disk (an external image type: TSK calls read())."""

    def __new__(cls, disk: RemoteDisk):
        pytsk3 = _tsk()

        class Image(pytsk3.Img_Info):  # type: ignore[name-defined]  # pytsk3 is imported at run time, in the child
            def __init__(self) -> None:
                super().__init__(url="", type=pytsk3.TSK_IMG_TYPE_EXTERNAL)

            def read(self, offset, size):
                return disk.read(offset, size)

            def get_size(self):
                return disk.size

        return Image()


FS_NAMES = {0x80: "ext2", 0x100: "ext3", 0x2000: "ext4", 0x1: "ntfs", 0x2: "fat12", 0x4: "fat16", 0x8: "fat32",
            0xA: "exfat"}  # fmt: skip


def partitions(disk: RemoteDisk, image) -> list[dict]:
    """The data partitions of the disk (MBR or GPT), numbered from 1, each with its file system."""
    found = partition_table(disk, image)
    for part in found:
        part["filesystem"] = detect(disk, image, part["offset"], part["size"])
    return found


def partition_table(disk: RemoteDisk, image) -> list[dict]:
    """The data partitions, numbered from 1 (`partition`, `offset`, `size`, `label`).

    A disk with no partition table is one partition: the whole disk.
    """
    pytsk3 = _tsk()
    found = []
    try:
        volume = pytsk3.Volume_Info(image)
        sector = volume.info.block_size
        for part in volume:
            if part.flags & pytsk3.TSK_VS_PART_FLAG_ALLOC and part.len > 0:
                label = part.desc.decode("utf-8", "replace").strip("\x00 ")
                found.append({"offset": part.start * sector, "size": part.len * sector, "label": label})
    except OSError:
        found = [{"offset": 0, "size": disk.size, "label": ""}]
    for number, part in enumerate(found, start=1):
        part["partition"] = number
    return found


def detect(disk: RemoteDisk, image, offset: int, size: int) -> str:
    """The file system's name, or "unknown"."""
    pytsk3 = _tsk()
    try:
        fs = pytsk3.FS_Info(image, offset=offset)
        return FS_NAMES.get(int(fs.info.ftype), "unknown")
    except OSError:
        pass
    if disk.read(offset, 4) == b"XFSB":
        return "xfs"
    return "unknown"


# --- file systems -------------------------------------------------------------------------------


def _iso(ns: int | None) -> str | None:
    if not ns:
        return None
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat().replace("+00:00", "Z")


# The names TSK gives exFAT's special root entries (tsk_exfatfs.h): metadata, not files (on disk those
# entries have no name). An owner's own file of exactly such a name in the root would be hidden too.
EXFAT_SPECIAL = {b"$EMPTY_VOLUME_LABEL", b"$VOLUME_GUID", b"$ALLOC_BITMAP", b"$UPCASE_TABLE", b"$TEX_FAT",
                 b"$ACCESS_CONTROL_TABLE"}  # fmt: skip


class TskFS:
    """ext2-4, NTFS, FAT and exFAT through The Sleuth Kit."""

    def __init__(self, image, offset: int, name: str) -> None:
        pytsk3 = self._t = _tsk()
        self.name = name
        self._fs = pytsk3.FS_Info(image, offset=offset)
        self._last = int(self._fs.info.last_inum)
        # FAT and NTFS permissions are not Unix modes: none is reported for them.
        self._has_modes = name.startswith("ext")

    def _hidden(self, raw: bytes, addr: int, at_root: bool) -> bool:
        # TSK's own virtual entries ($OrphanFiles; FAT's $MBR, $FAT1, $FAT2) and NTFS's
        # metadata files ($MFT, $Bitmap... in the root) are not the owner's files.
        if raw in (b".", b".."):
            return True
        if self.name.startswith(("fat", "exfat")) and raw.endswith(b"(Volume Label Entry)"):
            return True  # TSK shows a FAT volume label as a file of that name
        if self.name == "exfat" and at_root and raw in EXFAT_SPECIAL:
            return True
        if raw.startswith(b"$") and (addr >= self._last - 3 or (self.name == "ntfs" and at_root and addr < 64)):
            return True
        return False

    def _entry(self, name: str, meta) -> dict:
        t = self._t
        kind = {t.TSK_FS_META_TYPE_DIR: "dir", t.TSK_FS_META_TYPE_REG: "file", t.TSK_FS_META_TYPE_LNK: "symlink"}
        mtime = int(meta.mtime) * 10**9 + int(getattr(meta, "mtime_nano", 0) or 0)
        return {
            "name": name,
            "type": kind.get(meta.type, "other"),
            "size": int(meta.size) if meta.type == t.TSK_FS_META_TYPE_REG else 0,
            "mtime_ns": mtime,
            "mode": (int(meta.mode) & 0o7777) if self._has_modes else None,
        }

    def _open(self, path: str):
        try:
            return self._fs.open(path)
        except OSError:
            raise ParseError(NO_SUCH_PATH, f"{path} is not in this partition.") from None

    def stat(self, path: str) -> dict:
        f = self._open(path)
        if f.info.meta is None:
            raise ParseError(NO_SUCH_PATH, f"{path} is not in this partition.")
        return self._entry(posixpath.basename(path) or "/", f.info.meta)

    def list(self, path: str) -> list[dict]:
        t = self._t
        if self.stat(path)["type"] != "dir":
            raise ParseError(NO_SUCH_PATH, f"{path} is not a folder.")
        try:
            directory = self._fs.open_dir(path)
        except OSError:
            raise ParseError(NO_SUCH_PATH, f"{path} is not a folder.") from None
        out = []
        for f in directory:
            name = f.info.name
            if not name.flags & t.TSK_FS_NAME_FLAG_ALLOC or f.info.meta is None:
                continue  # deleted names TSK still finds are not in the restore point
            if f.info.meta.flags & t.TSK_FS_META_FLAG_UNALLOC:
                continue
            if f.info.meta.type in (t.TSK_FS_META_TYPE_VIRT, t.TSK_FS_META_TYPE_VIRT_DIR):
                continue
            if self._hidden(name.name, int(name.meta_addr), path == "/"):
                continue
            out.append(self._entry(name.name.decode("utf-8", "surrogateescape"), f.info.meta))
        return out

    def chunks(self, path: str, size: int):
        f = self._open(path)
        offset = 0
        while offset < size:
            data = f.read_random(offset, min(OUT_CHUNK, size - offset))
            if not data:
                raise ParseError(UNREADABLE, f"{path} could not be read to its end.")
            offset += len(data)
            yield data


class XfsFS:
    """XFS through dissect.xfs."""

    name = "xfs"

    def __init__(self, disk: RemoteDisk, offset: int, size: int) -> None:
        from dissect.xfs import XFS

        self._fs = XFS(Slice(disk, offset, size))

    def _node(self, path: str):
        try:
            return self._fs.get(path)
        except (FileNotFoundError, NotADirectoryError):
            raise ParseError(NO_SUCH_PATH, f"{path} is not in this partition.") from None

    @staticmethod
    def _entry(name: str, node) -> dict:
        kind = {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "symlink"}.get(node.filetype, "other")
        return {
            "name": name,
            "type": kind,
            "size": int(node.size) if kind == "file" else 0,
            "mtime_ns": int(node.mtime_ns),
            "mode": int(node.inode.di_mode) & 0o7777,
        }

    def stat(self, path: str) -> dict:
        return self._entry(posixpath.basename(path) or "/", self._node(path))

    def list(self, path: str) -> list[dict]:
        node = self._node(path)
        if node.filetype != stat.S_IFDIR:
            raise ParseError(NO_SUCH_PATH, f"{path} is not a folder.")
        return [self._entry(name, child) for name, child in node.listdir().items() if name not in (".", "..")]

    def chunks(self, path: str, size: int):
        f = self._node(path).open()
        left = size
        while left > 0:
            data = f.read(min(OUT_CHUNK, left))
            if not data:
                raise ParseError(UNREADABLE, f"{path} could not be read to its end.")
            left -= len(data)
            yield data


def open_fs(disk: RemoteDisk, image, number: int):
    """The file system of partition ``number``; 314 when there is no such partition, 315 when unreadable."""
    part = next((p for p in partition_table(disk, image) if p["partition"] == number), None)
    if part is None:
        raise ParseError(NO_SUCH_PATH, f"This restore point has no partition {number}.")
    name = detect(disk, image, part["offset"], part["size"])
    try:
        if name == "xfs":
            return XfsFS(disk, part["offset"], part["size"])
        if name != "unknown":
            return TskFS(image, part["offset"], name)
    except ParseError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parser failure on a damaged image is a 315
        raise ParseError(UNREADABLE, f"Partition {number}'s {name} file system could not be read: {exc}") from None
    raise ParseError(
        UNREADABLE, f"Partition {number} holds no file system ReClo can read (ext4, XFS, NTFS, FAT, exFAT)."
    )


def clean_path(path: str) -> str:
    """An absolute path with no `.`, `..` or doubled slashes (`..` stops at the root)."""
    if not isinstance(path, str) or "\x00" in path:
        raise ParseError(NO_SUCH_PATH, "That path is not valid.")
    return posixpath.normpath("/" + path.lstrip("/")).replace("//", "/")


# --- output --------------------------------------------------------------------------------------


def _zip_time(ns: int) -> tuple:
    # Zip stores local-looking times from 1980 on; the agent restores the exact time from the
    # extended timestamp field written beside it.
    t = time.gmtime(max(ns // 10**9, 315532800))
    return t[:6]


def _extended_time(ns: int) -> bytes:
    # The "UT" extra field (0x5455): the modification time in Unix seconds, read by Info-ZIP and by the agent.
    return struct.pack("<HHBl", 0x5455, 5, 1, max(-(2**31), min(2**31 - 1, ns // 10**9)))


class _Out(io.RawIOBase):
    """stdout as zipfile sees it: write-only, not seekable (so it writes data descriptors)."""

    def __init__(self, raw) -> None:
        super().__init__()
        self._raw = raw

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._raw.write(data)
        return len(data)

    def flush(self) -> None:
        self._raw.flush()


def write_zip(fs, root: str, out) -> None:
    """The folder ``root`` and everything under it as a zip, streamed to ``out`` (files keep times and modes)."""
    sink = _Out(out)
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1, allowZip64=True) as zf:
        stack = [("", root)]
        while stack:
            prefix, path = stack.pop()
            for entry in sorted(fs.list(path), key=lambda e: e["name"]):
                child = posixpath.join(path, entry["name"])
                arcname = prefix + entry["name"]
                info = zipfile.ZipInfo(arcname + ("/" if entry["type"] == "dir" else ""), _zip_time(entry["mtime_ns"]))
                info.extra = _extended_time(entry["mtime_ns"])
                mode = entry["mode"] if entry["mode"] is not None else (0o755 if entry["type"] == "dir" else 0o644)
                if entry["type"] == "dir":
                    info.external_attr = ((stat.S_IFDIR | mode) << 16) | 0x10
                    zf.writestr(info, b"")
                    stack.append((arcname + "/", child))
                elif entry["type"] == "file":
                    info.external_attr = (stat.S_IFREG | mode) << 16
                    info.compress_type = zipfile.ZIP_DEFLATED
                    info.file_size = entry["size"]
                    with zf.open(info, "w", force_zip64=entry["size"] > 2**31) as member:
                        for data in fs.chunks(child, entry["size"]):
                            member.write(data)
                # Symbolic links and special files are not taken into a zip.
    out.flush()


def run(command: dict, disk: RemoteDisk, out, limits: dict) -> None:
    """Answer one command on ``out``."""
    image = _Image(disk)
    op = command.get("op")
    if op == "partitions":
        parts = [{k: p[k] for k in ("partition", "filesystem", "size", "label")} for p in partitions(disk, image)]
        out.write(json.dumps({"partitions": parts, "limits": limits}).encode() + b"\n")
        return
    number = command.get("partition")
    if not isinstance(number, int) or isinstance(number, bool):
        raise ParseError(NO_SUCH_PATH, "That partition is not valid.")
    fs = open_fs(disk, image, number)
    path = clean_path(command.get("path", "/"))
    if op == "list":
        entries = [{**e, "modified": _iso(e["mtime_ns"])} for e in fs.list(path)]
        out.write(json.dumps({"entries": entries, "filesystem": fs.name, "limits": limits}).encode() + b"\n")
        return
    if op == "read":
        entry = fs.stat(path)
        head = {**entry, "modified": _iso(entry["mtime_ns"]), "limits": limits}
        if entry["type"] == "dir":
            out.write(json.dumps({**head, "kind": "zip"}).encode() + b"\n")
            write_zip(fs, path, out)
        elif entry["type"] == "file":
            out.write(json.dumps({**head, "kind": "file"}).encode() + b"\n")
            for data in fs.chunks(path, entry["size"]):
                out.write(data)
            out.flush()
        else:
            raise ParseError(NO_SUCH_PATH, f"{path} is neither a file nor a folder.")
        return
    raise ParseError(NO_SUCH_PATH, f"unknown command {op!r}")


def _fail(code: int, message: str) -> int:
    sys.stderr.write("\n" + json.dumps({"code": code, "message": message}) + "\n")
    return 3


def main(argv: list[str]) -> int:
    """Entry point of the sandboxed child (see the module docstring)."""
    sock = socket.socket(fileno=int(argv[1]))
    cpu_seconds = int(argv[2]) if len(argv) > 2 else 300
    # Import the parsers before the limits: loading shared libraries after dropping them may fail.
    _tsk()
    import dissect.xfs  # noqa: F401

    limits = confine(cpu_seconds)
    out = sys.stdout.buffer
    try:
        command = json.loads(sys.stdin.readline())
        run(command, RemoteDisk(sock), out, limits)
    except ParseError as exc:
        return _fail(exc.code, exc.message)
    except MemoryError:
        return _fail(UNREADABLE, "The file system needs too much memory to read.")
    except BrokenPipeError:
        return 4  # the parent stopped reading (a download cancelled)
    except Exception as exc:  # noqa: BLE001 - a damaged image may break a parser anywhere
        return _fail(UNREADABLE, f"The file system could not be read: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
