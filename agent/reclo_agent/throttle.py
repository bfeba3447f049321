"""Bandwidth limit: a token bucket shared by every part upload of a run."""

from __future__ import annotations

import io
import re
import threading
import time
from collections.abc import Callable

from .errors import UsageError

_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)(?:i?b)?(?:/s)?\s*$", re.IGNORECASE)


def parse_rate(text: str) -> int:
    """``"10M"``, ``"512k"``, ``"1.5MiB/s"``, ``"2000000"`` -> bytes per second."""
    m = _RATE_RE.match(text or "")
    if not m:
        raise UsageError(f"Bandwidth limit {text!r} is not a rate like 10M, 512K or 1G (bytes per second).")
    rate = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if rate < 16 * 1024:
        raise UsageError(f"Bandwidth limit {text!r} is below 16 KiB/s; uploads would never finish.")
    return rate


class TokenBucket:
    """Allows ``rate`` bytes per second on average, bursts up to ``burst`` bytes."""

    def __init__(
        self,
        rate: int,
        burst: int | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = rate
        self.burst = burst or max(64 * 1024, rate // 4)
        self._tokens = float(self.burst)
        self._clock = clock
        self._sleep = sleep
        self._last = clock()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        """Block until ``n`` bytes may go."""
        while n > 0:
            chunk = min(n, self.burst)
            with self._lock:
                now = self._clock()
                self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
                self._last = now
                self._tokens -= chunk  # may go negative: the debt is slept off below
                wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
            if wait > 0:
                self._sleep(wait)
            n -= chunk


class ThrottledBody(io.RawIOBase):
    """A part's bytes as a seekable file whose reads wait on a :class:`TokenBucket`.

    botocore reads a request body in small chunks and seeks back to retry,
    so throttling the reads throttles the wire.
    """

    def __init__(self, data: bytes, bucket: TokenBucket) -> None:
        super().__init__()
        self._view = memoryview(data)
        self._bucket = bucket
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, min(len(self._view), base + offset))
        return self._pos

    def readinto(self, b) -> int:
        n = min(len(b), len(self._view) - self._pos)
        if n <= 0:
            return 0
        self._bucket.take(n)
        b[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def __len__(self) -> int:
        return len(self._view)
