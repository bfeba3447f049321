"""A stored object read straight from S3: in order, in parallel, hashed on the way.

A restore reads each object of the chain once, front to back: the VHD
writer lays blocks out in increasing block order, one zstd frame each, so
as the restore walks the disk block by block every layer's reads move
forward through its object. :class:`ObjectStream` exploits that:

- the object is fetched in ``chunk_size`` ranged GETs, ``ahead`` of them in
  flight on a shared thread pool, so the link stays busy while the main
  thread decompresses;
- every byte passes through SHA-256 in order, so the object's checksum is
  known when the restore ends, with no second download (bytes the restore
  never needed -- frames fully hidden by a newer layer -- are still fetched
  and hashed when :meth:`sha256_hexdigest` drains the stream);
- the tail (the seek table and the VHD footer, read first) is fetched once
  up front;
- any other read (backwards, or far ahead) is served by its own ranged
  GET, so the reader stays correct for any layout, merely slower.

Memory: (ahead + 1) chunks plus the tail, per object.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor

from .errors import Unreachable
from .s3 import S3Access
from .vhd.streams import read_fully

MiB = 1024 * 1024


class ObjectStream(io.RawIOBase):
    def __init__(
        self,
        s3: S3Access,
        key: str,
        size: int,
        pool: Executor,
        *,
        chunk_size: int = 4 * MiB,
        ahead: int = 4,
        tail_size: int = MiB,
        on_bytes: Callable[[int], None] | None = None,
        version_id: str | None = None,
        etag: str | None = None,
    ) -> None:
        super().__init__()
        self._s3 = s3
        self.key = key
        # Every GET reads the version the portal verified (and names its
        # ETag): bytes written over the key later are never read, and an
        # object that changed is refused (PreconditionFailed, NoSuchVersion).
        self._pinned = {}
        if version_id:
            self._pinned["VersionId"] = version_id
        if etag:
            self._pinned["IfMatch"] = f'"{etag}"'
        self.size = size
        self._pool = pool
        self._chunk = chunk_size
        self._ahead = max(1, ahead)
        self._on_bytes = on_bytes
        self._pos = 0
        self._hash = hashlib.sha256()
        # Hashing runs on its own thread (hashlib releases the GIL), in
        # order, beside the decompression in the main thread.
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="reclo-sha256")
        self._hashed: Future | None = None
        self._lock = threading.Lock()
        self.requests = 0
        self.direct_reads = 0
        # [0, _stream_end) is streamed in chunks; [_stream_end, size) is the tail.
        self._stream_end = max(0, size - tail_size)
        self._tail = self._get(self._stream_end, size) if size else b""
        self._chunks = -(-self._stream_end // self._chunk)
        self._futures: deque[Future] = deque()
        self._next_fetch = 0
        self._cur_index = -1
        self._cur = b""
        self._fill()

    # --- fetching -----------------------------------------------------------

    def _get(self, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        with self._lock:
            self.requests += 1
        resp = self._s3.call("get_object", Key=self.key, Range=f"bytes={start}-{end - 1}", **self._pinned)
        try:
            data = resp["Body"].read()
        except Exception as exc:  # noqa: BLE001 - any transport failure mid-body
            raise Unreachable(f"Reading {self.key} from cloud storage broke off ({type(exc).__name__}).") from exc
        if len(data) != end - start:
            raise Unreachable(f"Cloud storage returned {len(data)} of {end - start} bytes of {self.key}.")
        if self._on_bytes:
            self._on_bytes(len(data))
        return data

    def _fill(self) -> None:
        while len(self._futures) < self._ahead and self._next_fetch < self._chunks:
            start = self._next_fetch * self._chunk
            self._futures.append(self._pool.submit(self._get, start, min(start + self._chunk, self._stream_end)))
            self._next_fetch += 1

    def _advance_to(self, index: int) -> None:
        while self._cur_index < index:
            data = self._futures.popleft().result()
            self._hashed = self._hasher.submit(self._hash.update, data)
            self._cur_index += 1
            self._cur = data
            self._fill()

    # --- the file object --------------------------------------------------------

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, b) -> int:
        view = memoryview(b).cast("B")
        pos = self._pos
        n = min(len(view), self.size - pos)
        if n <= 0:
            return 0
        if pos >= self._stream_end:
            at = pos - self._stream_end
            view[:n] = self._tail[at : at + n]
        else:
            n = min(n, self._stream_end - pos)
            index, within = divmod(pos, self._chunk)
            # The current chunk or one already requested: move the stream there.
            if self._cur_index <= index <= self._cur_index + len(self._futures):
                self._advance_to(index)
                n = min(n, len(self._cur) - within)
                view[:n] = self._cur[within : within + n]
            else:
                # Behind the stream or far ahead of it: a read of its own.
                self.direct_reads += 1
                n = min(n, self._chunk)
                view[:n] = self._get(pos, pos + n)
        self._pos += n
        return n

    def read_span(self, start: int, n: int) -> bytes | memoryview:
        """``n`` bytes from ``start``, moving the stream there: a view of the chunk that holds them, or (across
        chunks, or outside the streamed part) a copy. Raises :class:`Unreachable` when the object is shorter."""
        if n > 0 and start + n <= self._stream_end:
            index, within = divmod(start, self._chunk)
            if within + n <= self._chunk and self._cur_index <= index <= self._cur_index + len(self._futures):
                self._advance_to(index)
                if within + n <= len(self._cur):
                    self._pos = start + n
                    return memoryview(self._cur)[within : within + n]
        self.seek(start)
        data = read_fully(self, n)
        if len(data) != n:
            raise Unreachable(f"{self.key} ends {n - len(data)} bytes short of the range asked for.")
        return data

    def sha256_hexdigest(self) -> str:
        """The object's SHA-256 (fetching whatever the restore did not need)."""
        self._advance_to(self._chunks - 1)
        if self._hashed is not None:
            self._hashed.result()
        digest = self._hash.copy()
        digest.update(self._tail)
        return digest.hexdigest()

    def cancel(self) -> None:
        for future in self._futures:
            future.cancel()
        self._futures.clear()
        self._hasher.shutdown(wait=True)
