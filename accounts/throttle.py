"""Failed-login throttling per account and per address (code LOGIN_THROTTLED).

Counters live in Django's cache, which is Redis in production and files
under var/ locally, so every web process shares them. Only failures count;
a successful login clears the account's counter.
"""

import hashlib
import time

from django.conf import settings
from django.core.cache import cache


def _key(kind: str, value: str) -> str:
    digest = hashlib.sha256(value.strip().lower().encode()).hexdigest()[:32]
    return f"login-fail:{kind}:{digest}"


def _window() -> int:
    return int(settings.LOGIN_FAILURE_WINDOW.total_seconds())


def retry_after(email: str, address: str) -> int:
    """Seconds to wait when this account or address is locked out, else 0."""
    now = time.time()
    for key, limit in (
        (_key("account", email), settings.LOGIN_FAILURES_PER_ACCOUNT),
        (_key("address", address), settings.LOGIN_FAILURES_PER_ADDRESS),
    ):
        if (cache.get(key) or 0) >= limit:
            started = cache.get(key + ":start") or now
            return max(1, int(started + _window() - now))
    return 0


def record_failure(email: str, address: str) -> None:
    """Count one failed login against the account and the address."""
    for key in (_key("account", email), _key("address", address)):
        # add() then incr() keeps concurrent failures from being lost
        # (both are atomic in Redis); the window starts at the first failure.
        cache.add(key + ":start", time.time(), timeout=_window())
        cache.add(key, 0, timeout=_window())
        try:
            cache.incr(key)
        except ValueError:  # expired between add() and incr()
            cache.set(key, 1, timeout=_window())


def clear_account(email: str) -> None:
    key = _key("account", email)
    cache.delete_many([key, key + ":start"])
