"""Files in a restore point: browse its partitions and folders, take files and folders back.

Three processes take part, so that file system code reading a customer's
image never runs where the portal's secrets are:

- the **web process** checks the restore point is the user's and verified,
  sends a `files_job` task and waits for its answer in the shared cache
  (a listing), or streams it from there chunk by chunk (a download);
- the **worker** (the task) gets read-only credentials for that one chain
  (the same session policy as a restore grant), opens the chain reader over
  ranged GETs of the pinned versions, with a block cache, and serves its
  bytes to...
- the **parser child** (`backups.fsparse`), started with an empty
  environment, which confines itself (no network, memory and CPU limits)
  and answers with the listing or the file's bytes.

The disk is never materialised: the child asks for the ranges it needs.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from django.core.cache import cache
from kombu.exceptions import OperationalError as BrokerError
from reclo_agent.vhd import ChainReader, VHDError, VHDReader, open_seekable

from accounts.audit import audit_record
from accounts.models import AuditEvent
from reclo_site import cloud
from reclo_site.cloud import credentials, storage
from reclo_site.errors import Code, ServiceError

from .. import fsparse
from ..chains import chain_of
from ..models import Backup
from .downloads import read_policy

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent.parent

# How long the web process waits for a listing or a download's first bytes;
# a download's next chunk may take as long (a slow S3 read, a busy worker).
ANSWER_TIMEOUT = 60.0
CHUNK_TIMEOUT = 60.0
# Chunks a download may run ahead of its reader: the cache holds at most this many MiB per download.
WINDOW = 8
JOB_TTL = 10 * 60
POLL = 0.01
# The child's limits: CPU seconds, and the wall time its parent gives it.
LIST_CPU, LIST_WALL = 60, 90
READ_CPU, READ_WALL = 3600, 4 * 3600
# VHD blocks (2 MiB) the worker keeps: a listing reads inode tables and directories again and again.
BLOCK_CACHE = 32

MAX_PATH = 4096


def _key(job: str, part: str) -> str:
    return f"files:{job}:{part}"


# --- worker side: the chain and the sandbox --------------------------------------------------------


class BlockCache:
    """`read(offset, length)` over a ChainReader, keeping the last BLOCK_CACHE blocks."""

    def __init__(self, chain: ChainReader, blocks: int = BLOCK_CACHE) -> None:
        self._chain = chain
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._limit = blocks
        self.size = chain.virtual_size
        self.block_size = chain.block_size

    def _block(self, index: int) -> bytes:
        data = self._blocks.get(index)
        if data is None:
            data = self._chain.read_block(index)
            self._blocks[index] = data
            if len(self._blocks) > self._limit:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(index)
        return data

    def read(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        parts = []
        while offset < end:
            index, within = divmod(offset, self.block_size)
            part = self._block(index)[within : within + end - offset]
            if not part:
                break
            parts.append(part)
            offset += len(part)
        return b"".join(parts)


def _serve(sock: socket.socket, disk, failures: list) -> None:
    """Answer the child's read requests until it closes its end."""
    try:
        while True:
            head = b""
            while len(head) < fsparse.REQUEST.size:
                more = sock.recv(fsparse.REQUEST.size - len(head))
                if not more:
                    return
                head += more
            offset, length = fsparse.REQUEST.unpack(head)
            if offset == 0 and length == 0:
                sock.sendall(fsparse.ANSWER.pack(8) + struct.pack("<Q", disk.size))
                continue
            try:
                data = disk.read(offset, min(length, fsparse.MAX_READ))
            except (VHDError, cloud.CloudError, OSError) as exc:
                failures.append(exc)
                sock.sendall(fsparse.ANSWER.pack(0xFFFFFFFF))
                continue
            sock.sendall(fsparse.ANSWER.pack(len(data)) + data)
    except OSError:
        return  # the child is gone


def sandbox_run(disk, command: dict, *, on_head: Callable[[dict], None], on_data: Callable[[bytes], None] | None = None,
                cpu: int = LIST_CPU, wall: float = LIST_WALL) -> dict:  # fmt: skip
    """Run one parser command in a confined child over `disk` (anything with `size` and `read(offset, length)`).

    `on_head` gets the answer's JSON line, `on_data` the bytes after it (a
    download). Raises ServiceError 314/315 from the child's answer; 315 when
    it dies (its memory or CPU limit) or overruns `wall` seconds.
    """
    parent, child = socket.socketpair()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT), "LANG": "C.UTF-8"}
    proc = subprocess.Popen(
        [sys.executable, "-I", "-c", "import sys; sys.path.insert(0, sys.argv[3]); from backups import fsparse; "
         "sys.exit(fsparse.main(sys.argv[:3]))", str(child.fileno()), str(cpu), str(ROOT)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=[child.fileno()], env=env,
        cwd="/", start_new_session=True,
    )  # fmt: skip
    child.close()
    failures: list = []
    server = threading.Thread(target=_serve, args=(parent, disk, failures), daemon=True)
    server.start()
    # stdin, stdout and stderr are PIPEs: buffered files.
    stdin, stdout, stderr = (cast(io.BufferedWriter, proc.stdin), cast(io.BufferedReader, proc.stdout),
                             cast(io.BufferedReader, proc.stderr))  # fmt: skip
    errors: list[bytes] = []
    drain = threading.Thread(target=lambda: errors.append(stderr.read()), daemon=True)
    drain.start()
    timer = threading.Timer(wall, proc.kill)
    timer.start()
    head: dict = {}
    try:
        stdin.write(json.dumps(command).encode() + b"\n")
        stdin.close()
        line = stdout.readline(1 << 24)
        if line.endswith(b"\n"):
            head = json.loads(line)
            on_head(head)
            while on_data is not None:
                data = stdout.read1(1 << 20)
                if not data:
                    break
                on_data(data)
        stdout.close()
        proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        timer.cancel()
        drain.join(5)
        parent.close()
        server.join(5)
    if proc.returncode == 0 and head:
        return head
    if failures:
        log.warning("reading the chain for the file browser failed: %s", failures[0])
    message = _child_error(b"".join(errors))
    if message is not None:
        raise ServiceError(Code.of(message["code"]), message["message"])
    if proc.returncode < 0:  # killed: its wall time (SIGKILL), its CPU limit (SIGXCPU), or a crash
        raise ServiceError(
            Code.FILESYSTEM_UNREADABLE, "Reading this file system took too long, needed too much memory or failed."
        )
    raise ServiceError(Code.FILESYSTEM_UNREADABLE, "The file system could not be read.")


def _child_error(stderr: bytes) -> dict | None:
    for line in reversed(stderr.decode("utf-8", "replace").strip().splitlines()):
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict) and message.get("code") in (Code.NO_SUCH_PATH, Code.FILESYSTEM_UNREADABLE):
            return message
        break
    log.warning("file system reader failed: %s", stderr[-2000:].decode("utf-8", "replace"))
    return None


def open_chain_reader(chain: list[Backup], creds: credentials.TemporaryCredentials) -> BlockCache:
    """The chain's disk, read through credentials that reach these objects only, at their verified versions."""
    s3 = storage.scoped_client(creds)
    layers = [VHDReader(open_seekable(storage.ObjectReader(p.key, **p.pinned, s3=s3)))
              for p in chain]  # fmt: skip
    return BlockCache(ChainReader(layers))


def _restorable(*, user_id: int, backup_id) -> list[Backup]:
    """The chain (base first) of the user's verified restore point; 404 (NOT_FOUND) for any other id."""
    backup = Backup.objects.filter(user_id=user_id, pk=backup_id, deleted_at__isnull=True).first()
    if backup is None:
        raise ServiceError(Code.NOT_FOUND, "No restore point with that id.")
    chain = chain_of(backup)
    for point in chain:
        if point.status != Backup.Status.VERIFIED:
            raise ServiceError(
                Code.NO_RESTORABLE_BACKUP, f"Restore point {point.pk} of this chain is {point.status}, not verified."
            )
    return chain


def files_check(*, user, backup_id) -> None:
    """NOT_FOUND unless `backup_id` is the user's restore point, NO_RESTORABLE_BACKUP unless its chain is verified.

    Views call it before looking at the query, so another tenant's id answers 404 whatever else is wrong.
    """
    _restorable(user_id=user.pk, backup_id=backup_id)


def files_job_run(*, job: str, user_id: int, backup_id: str, command: dict, eager: bool = False) -> None:
    """The worker's half of a browse or a download: answers into the shared cache under `job`.

    `files:<job>:head` gets the answer (or `{"code", "message"}`); a
    download's bytes follow as `files:<job>:<n>` chunks, at most WINDOW ahead of
    the reader's `ack`, then `files:<job>:end`. Idempotent enough for a
    redelivery: a second run writes the same answer again.
    """
    try:
        chain = _restorable(user_id=user_id, backup_id=backup_id)
        try:
            policy = read_policy(user_id, [p.key for p in chain])
            creds = credentials.issue(policy=policy, session_name=f"reclo-files-{user_id}-{job[:8]}")
            disk = open_chain_reader(chain, creds)
        except cloud.CloudError as exc:
            raise ServiceError(Code.FILESYSTEM_UNREADABLE, "The restore point could not be read from storage.") from exc
        except VHDError as exc:
            raise ServiceError(Code.FILESYSTEM_UNREADABLE, f"The restore point could not be read: {exc}") from exc
        if command["op"] != "read":
            sandbox_run(disk, command, on_head=lambda head: cache.set(_key(job, "head"), head, JOB_TTL))
            return
        sent = [0]

        def on_data(data: bytes) -> None:
            if cache.get(_key(job, "cancel")):
                raise _ReaderGone
            _wait_window(job, sent[0], eager)
            cache.set(_key(job, str(sent[0])), data, JOB_TTL)
            sent[0] += 1

        sandbox_run(disk, command, on_head=lambda head: cache.set(_key(job, "head"), head, JOB_TTL), on_data=on_data,
                    cpu=READ_CPU, wall=READ_WALL)  # fmt: skip
        cache.set(_key(job, "end"), {"chunks": sent[0]}, JOB_TTL)
    except ServiceError as exc:
        answer = {"code": int(exc.code), "message": exc.message}
        if cache.get(_key(job, "head")) is None:
            cache.set(_key(job, "head"), answer, JOB_TTL)
        else:
            cache.set(_key(job, "end"), {"error": answer}, JOB_TTL)
    except _ReaderGone:
        log.info("download %s: the reader went away", job)


class _ReaderGone(Exception):
    pass


def _wait_window(job: str, n: int, eager: bool) -> None:
    if eager:
        return  # a task run inline (tests, eager mode) has its reader waiting after it: no window
    deadline = time.monotonic() + CHUNK_TIMEOUT
    while n - (cache.get(_key(job, "ack")) or 0) >= WINDOW:
        if time.monotonic() > deadline:
            raise _ReaderGone
        time.sleep(POLL)


# --- web side ----------------------------------------------------------------------------------------


def _command(op: str, partition, path) -> dict:
    command: dict = {"op": op}
    if partition is not None:
        command["partition"] = partition
        command["path"] = path or "/"
        if len(command["path"]) > MAX_PATH or "\x00" in command["path"]:
            raise ServiceError(Code.MALFORMED, "That path is too long.", fields={"path": ["too long."]})
    return command


def _start(*, user, backup_id, command: dict) -> str:
    from ..tasks import files_job

    _restorable(user_id=user.pk, backup_id=backup_id)  # a quick 404 before any worker is asked
    job = uuid.uuid4().hex
    try:
        files_job.delay(job, user.pk, str(backup_id), command)
    except (BrokerError, OSError) as exc:
        raise ServiceError(
            Code.FILESYSTEM_UNREADABLE, "The restore point cannot be read right now; try again shortly."
        ) from exc
    return job


def _wait(job: str, part: str, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        value = cache.get(_key(job, part))
        if value is not None:
            return value
        if time.monotonic() > deadline:
            return None
        time.sleep(POLL)


def _answer(job: str) -> dict:
    head = _wait(job, "head", ANSWER_TIMEOUT)
    if head is None:
        raise ServiceError(Code.FILESYSTEM_UNREADABLE, "Reading the restore point took too long; try again shortly.")
    if "code" in head:
        raise ServiceError(Code.of(head["code"]), head["message"])
    return head


def files_browse(*, user, backup_id, partition: int | None = None, path: str = "/") -> dict:
    """`{"partitions": [...]}` without a partition, else `{"entries": [...], "filesystem"}` of the folder `path`.

    NOT_FOUND for an id that is not the user's restore point; NO_SUCH_PATH,
    FILESYSTEM_UNREADABLE from the reader. Folders come first, then by name.
    """
    command = _command("partitions" if partition is None else "list", partition, path)
    head = _answer(_start(user=user, backup_id=backup_id, command=command))
    if partition is None:
        return {"partitions": head["partitions"]}
    entries = sorted(head["entries"], key=lambda e: (e["type"] != "dir", e["name"].casefold(), e["name"]))
    return {"entries": entries, "filesystem": head["filesystem"]}


@dataclass
class FileDownload:
    """A file, or a folder as a zip, being streamed from the worker."""

    name: str
    kind: str  # "file" or "zip"
    size: int | None  # a zip's size is known only at its end
    modified: str | None
    mode: int | None
    chunks: Iterator[bytes]


def files_download(*, user, backup_id, partition: int, path: str, request=None) -> FileDownload:
    """Start streaming `path` of partition `partition`; audit-logged. Errors as files_browse."""
    command = _command("read", partition, path)
    job = _start(user=user, backup_id=backup_id, command=command)
    head = _answer(job)
    name = head["name"] if head["name"] != "/" else f"partition-{partition}"
    kind = head["kind"]
    size = head["size"] if kind == "file" else None
    audit_record(AuditEvent.Kind.FILES_DOWNLOADED, user=user, request=request, backup_id=str(backup_id),
                 partition=partition, path=command["path"], what=kind, size=size)  # fmt: skip
    return FileDownload(
        name=name + (".zip" if kind == "zip" else ""),
        kind=kind,
        size=head["size"] if kind == "file" else None,
        modified=head.get("modified"),
        mode=head.get("mode"),
        chunks=_stream(job),
    )


def _stream(job: str) -> Iterator[bytes]:
    n, finished = 0, False
    try:
        while True:
            data = _wait_any(job, n)
            if data is None:
                log.warning("download %s: no chunk %d within %.0f s", job, n, CHUNK_TIMEOUT)
                return
            if isinstance(data, dict):  # the end marker; every chunk was written before it
                data = cache.get(_key(job, str(n)))
                if data is None:
                    end = cache.get(_key(job, "end")) or {}
                    if "error" in end or n < end.get("chunks", 0):
                        log.warning("download %s ended short at chunk %d: %s", job, n, end.get("error"))
                    else:
                        finished = True
                    return
            cache.delete(_key(job, str(n)))
            n += 1
            cache.set(_key(job, "ack"), n, JOB_TTL)
            yield data
    finally:
        if not finished:  # the reader went away (a closed connection): the worker stops at its next chunk
            cache.set(_key(job, "cancel"), True, JOB_TTL)


def _wait_any(job: str, n: int):
    """Chunk `n`, or the end marker, or None after CHUNK_TIMEOUT."""
    deadline = time.monotonic() + CHUNK_TIMEOUT
    while time.monotonic() < deadline:
        data = cache.get(_key(job, str(n)))
        if data is not None:
            return data
        end = cache.get(_key(job, "end"))
        if end is not None:
            return end
        time.sleep(POLL)
    return None
