"""A general per-token request rate limit (code THROTTLED)."""

import math

from django.core.cache import cache
from rest_framework.throttling import SimpleRateThrottle


class TokenRateThrottle(SimpleRateThrottle):
    """Limits each token (or, without one, each address) to API_RATE requests.

    A fixed-window counter in the shared cache, so every web process sees it:
    one atomic increment per request. DRF's own throttle keeps a list of
    every request time in the window and reads and rewrites all of it on
    each request, which at the default 1200/min is ~10 KB each way. The cost
    of a fixed window is that a client may fit up to twice the rate into the
    two seconds around a window's edge, fine for a limit against runaway
    clients.
    """

    scope = "token"

    def get_cache_key(self, request, view):
        token = getattr(request, "auth", None)
        ident = f"t{token.pk}" if token is not None and hasattr(token, "pk") else self.get_ident(request)
        return self.cache_format % {"scope": self.scope, "ident": ident}

    def allow_request(self, request, view):
        if self.rate is None:
            return True
        key = self.get_cache_key(request, view)
        if key is None:
            return True
        self.now = self.timer()
        window = int(self.now // self.duration)
        self.window_end = (window + 1) * self.duration
        return _hit(f"{key}:{window}", self.duration + 1) <= self.num_requests

    def wait(self):
        return max(1, math.ceil(self.window_end - self.now))


def _hit(key: str, timeout: int) -> int:
    """Count one request against `key`, creating it with `timeout`; the new count."""
    try:
        return cache.incr(key)
    except ValueError:  # the window's first request (or its key just expired)
        if cache.add(key, 1, timeout=timeout):
            return 1
        try:
            return cache.incr(key)  # another process created it in between
        except ValueError:
            return 1
