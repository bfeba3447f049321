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

Writes go through `storage.ObjectWriter`, whose parts upload in the
background (`in_flight`), so the merge that produces a disk and the upload
overlap.
"""

from botocore.exceptions import BotoCoreError

from .errors import CloudUnavailable, translate
from .storage import (
    SeekableObject,
    head_object,
    pinned_args,
    read_call,
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
        resp = read_call(
            "get_object", self.key, "read", Range=f"bytes={self._pos}-{last}", **pinned_args(self.version_id, self.etag)
        )
        self._body = resp["Body"]
        self._body_pos = self._pos
        self._body_end = last + 1

    def _close_body(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None

    def _stream_read(self, n: int) -> bytes:
        assert self._body is not None, "readinto opens a stream first"
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
