"""Streaming reads and writes of S3 objects, for the failover's whole-disk scans.

`storage.ObjectReader` fetches fixed chunks by ranged GETs: right for a
parser that jumps about (a verifier), costly for a scan of a whole disk,
which then pays a request per chunk. A failover reads each layer of a
chain, and later the merged disk, nearly in order. `SequentialObjectReader`
keeps one GET streaming from the current position: reading on continues it,
a short seek forward skips through it, any other seek starts a new GET from
there to the end. A scan costs one request plus one per jump back. (Against
moto's server this matters even more: it copies the whole object for every
ranged GET, so chunked reads of a 1 GiB disk cost minutes.)

`ParallelObjectWriter` uploads the parts of a multipart upload in the
background, so the merge that produces a disk and the upload overlap.
"""

import io

from botocore.exceptions import BotoCoreError, ClientError

from .clients import client
from .errors import CloudError, CloudUnavailable, translate
from .storage import (
    MAX_PARTS,
    MIN_PART_SIZE,
    SeekableObject,
    abort_multipart_upload,
    bucket_name,
    head_object,
    pinned_args,
    read_error,
)

MiB = 1024 * 1024


class _StreamBroke(CloudUnavailable):
    """A GET's body stopped short: the connection dropped or timed out mid-stream."""


class SequentialObjectReader(SeekableObject):
    """Read-only, seekable; one streaming GET at a time.

    Every GET names the version and ETag seen on opening; `version_id` and
    `etag` pin it to a restore point's verified version (see ObjectReader).
    `end` bounds the GETs of a reader that needs only bytes before it (one
    span of a disk): S3 then sends no more than that, and a GET that starts
    at or after `end` runs to the object's end. A stream that breaks
    mid-way (a reset connection, a read timeout) is reopened where it broke,
    up to `retries` times in a row.
    """

    def __init__(
        self,
        key: str,
        *,
        version_id: str | None = None,
        etag: str | None = None,
        skip_limit: int = 8 * MiB,
        end: int | None = None,
        retries: int = 3,
    ):
        super().__init__()
        self.key = key
        info = head_object(key, version_id=version_id, etag=etag)
        self.size = info["size"]
        self.etag = info["etag"]
        self.version_id = info["version_id"]
        self._skip_limit = skip_limit
        self._end = self.size if end is None else min(end, self.size)
        self._retries = retries
        self._pos = 0
        self._body = None
        self._body_pos = 0  # where the open stream is
        self._body_end = 0  # and where its range ends
        self.requests = 0

    def _open(self) -> None:
        self._close_body()
        self.requests += 1
        last = (self._end if self._pos < self._end else self.size) - 1
        try:
            resp = client("s3").get_object(
                Bucket=bucket_name(),
                Key=self.key,
                Range=f"bytes={self._pos}-{last}",
                **pinned_args(self.version_id, self.etag),
            )
        except (ClientError, BotoCoreError) as exc:
            raise read_error(exc, self.key, "read") from exc
        self._body = resp["Body"]
        self._body_pos = self._pos
        self._body_end = last + 1

    def _close_body(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None

    def _stream_read(self, n: int) -> bytes:
        try:
            data = self._body.read(n)
        except BotoCoreError as exc:
            self._close_body()
            error = translate(exc, f"read {self.key}")
            raise _StreamBroke(str(error), error.code) from exc
        self._body_pos += len(data)
        return data

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        wanted = min(len(view), max(0, self.size - self._pos))
        if not wanted:
            return 0
        for attempt in range(self._retries + 1):
            try:
                return self._readinto(view, wanted)
            except _StreamBroke:
                # The stream broke (or ended early): the next try opens a new
                # GET where this one stopped, as S3's own SDKs do. (A GET
                # refused outright is not retried here: botocore already did.)
                self._close_body()
                if attempt == self._retries:
                    raise
        raise AssertionError("unreachable")

    def _readinto(self, view: memoryview, wanted: int) -> int:
        ahead = self._pos - self._body_pos
        if self._body is None or not 0 <= ahead <= self._skip_limit or self._pos >= self._body_end:
            self._open()
        while self._body_pos < self._pos:  # a short skip forward: read through it
            if not self._stream_read(min(self._pos - self._body_pos, MiB)):
                break
        wanted = min(wanted, self._body_end - self._pos)  # a short read at the end of a bounded range
        done = 0
        while done < wanted:
            data = self._stream_read(wanted - done)
            if not data:
                raise _StreamBroke(f"read {self.key}: stream ended at {self._body_pos} of {self.size}", "ShortRead")
            view[done : done + len(data)] = data
            done += len(data)
        self._pos += done
        return done

    def close(self) -> None:
        self._close_body()
        super().close()


class ParallelObjectWriter(io.RawIOBase):
    """A write-only stream into a new object: a multipart upload whose parts go up in the background.

    `storage.ObjectWriter` sends each part before the writer may go on; here
    up to `in_flight` parts upload on threads while the caller fills the
    next, so producing the data (a merge) and sending it overlap. Memory:
    `in_flight + 1` parts. `expected_size` (an upper bound) picks a part size
    within S3's 10,000 parts. As a context manager, an exception (in the
    block or in finish) aborts the upload: a failed write leaves neither an
    object nor parts.
    """

    def __init__(self, key: str, *, expected_size: int = 0, part_size: int = 16 * MiB, in_flight: int = 3):
        from concurrent.futures import ThreadPoolExecutor

        super().__init__()
        self.key = key
        needed = -(-int(expected_size * 1.05) // (MAX_PARTS - 100)) if expected_size else 0
        self.part_size = max(part_size, MIN_PART_SIZE, -(-needed // MiB) * MiB)
        self._in_flight = in_flight
        self._buffer = bytearray()
        self._pending: list = []
        self._parts: list[dict] = []
        self._pool = ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="s3-part")
        self.size = 0
        self.version_id = ""  # of the object written, once finished
        self._done = False
        try:
            self._upload_id = client("s3").create_multipart_upload(Bucket=bucket_name(), Key=key)["UploadId"]
        except (ClientError, BotoCoreError) as exc:
            self._pool.shutdown()
            raise translate(exc, f"start upload of {key}") from exc

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if self._done:
            raise ValueError("write to a finished ParallelObjectWriter")
        view = memoryview(data).cast("B")
        self._buffer += view
        self.size += len(view)
        while len(self._buffer) >= self.part_size:
            self._submit(bytes(self._buffer[: self.part_size]))
            del self._buffer[: self.part_size]
        return len(view)

    def _send(self, number: int, body: bytes) -> dict:
        try:
            resp = client("s3").upload_part(
                Bucket=bucket_name(), Key=self.key, UploadId=self._upload_id, PartNumber=number, Body=body
            )
        except (ClientError, BotoCoreError) as exc:
            raise translate(exc, f"upload part {number} of {self.key}") from exc
        return {"PartNumber": number, "ETag": resp["ETag"]}

    def _submit(self, body: bytes) -> None:
        while len(self._pending) >= self._in_flight:
            self._parts.append(self._pending.pop(0).result())
        number = len(self._parts) + len(self._pending) + 1
        self._pending.append(self._pool.submit(self._send, number, body))

    def finish(self) -> int:
        """Send the last part, wait for all, complete the upload; returns the object's size."""
        if self._done:
            return self.size
        if self._buffer or not (self._parts or self._pending):
            self._submit(bytes(self._buffer))
            self._buffer.clear()
        while self._pending:
            self._parts.append(self._pending.pop(0).result())
        self._pool.shutdown()
        try:
            resp = client("s3").complete_multipart_upload(
                Bucket=bucket_name(),
                Key=self.key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": sorted(self._parts, key=lambda p: p["PartNumber"])},
            )
        except (ClientError, BotoCoreError) as exc:
            raise translate(exc, f"complete upload of {self.key}") from exc
        self.version_id = resp.get("VersionId") or ""
        self._done = True
        return self.size

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        for future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)
        try:
            abort_multipart_upload(self.key, self._upload_id)
        except CloudError:
            pass  # the step aborts leftovers before it tries again

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.finish()
        finally:
            # Also when a part or the completion fails in finish(): its parts
            # would otherwise stay behind. Does nothing once finished.
            self.abort()
        return super().__exit__(exc_type, exc, tb)
