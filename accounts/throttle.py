"""Sign-in limits that slow a guesser down and never lock the owner out (LOGIN_THROTTLED).

Every password or two-factor attempt is counted in two scopes:

- per (account, address): ``LOGIN_FAILURES_PER_ACCOUNT`` attempts go ahead
  freely; after them each attempt must wait a doubling delay (1 s, 2 s,
  4 s ... up to ``LOGIN_BACKOFF_MAX``) before the next is checked;
- per address, whatever the account: ``LOGIN_FAILURES_PER_ADDRESS`` freely,
  then the same back-off.

Nothing is counted per account alone, so someone hammering an account from
elsewhere never refuses its owner's right password from an address of hers
that has no failures. Per account we only count failures, to email the owner
once when ``LOGIN_ALERT_AFTER`` of them come within a window.

An "address" is an IPv4 address or an IPv6 /64 (see :func:`network`). The
counters live in Django's cache: Redis in production, shared by every web
process (local runs without Redis use files, whose incr() is not atomic).
An attempt is counted *before* its password is checked, with ``add()`` then
``incr()`` (atomic in Redis: INCR), so parallel guesses are never lost;
beyond the free ones an attempt goes ahead only if it wins ``add()`` (SET
NX) of the scope's back-off slot, which then holds the scope shut for the
delay. So 30 parallel guesses count 30, and only the free ones and one more
are checked. A success forgets the (account, address) count and takes
itself back out of the address's count.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import time
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import cache

from reclo_site.errors import Code, ServiceError


def _digest(value: str) -> str:
    return hashlib.sha256(value.strip().lower().encode()).hexdigest()[:32]


def _window() -> int:
    return int(settings.LOGIN_FAILURE_WINDOW.total_seconds())


def _incr(key: str, timeout: int) -> int:
    """Atomically add one to `key`, creating it (with `timeout`) when missing."""
    cache.add(key, 0, timeout=timeout)
    try:
        return cache.incr(key)
    except ValueError:  # expired between add() and incr()
        cache.add(key, 0, timeout=timeout)
        return cache.incr(key)


@dataclass(frozen=True)
class Scope:
    """One counter: its cache key and how many attempts go ahead before back-off."""

    key: str
    free: int

    def delay(self, checked_beyond: int) -> int:
        """Seconds the scope stays shut after its n-th checked attempt beyond the free ones."""
        first = settings.LOGIN_BACKOFF_FIRST.total_seconds()
        cap = settings.LOGIN_BACKOFF_MAX.total_seconds()
        return max(1, int(min(cap, first * 2 ** min(checked_beyond, 30))))


def network(address: str) -> str:
    """What counts as one address: an IPv4 address, or an IPv6 /64.

    One IPv6 subscriber gets a whole /64 and could otherwise take a fresh
    address for every guess.
    """
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return address.strip().lower()
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False))


def scopes(account: str, address: str) -> tuple[Scope, Scope]:
    """The address's scope and the (account, address) pair's, in the order they are checked."""
    where = _digest(network(address))
    return (
        Scope(f"login:addr:{where}", settings.LOGIN_FAILURES_PER_ADDRESS),
        Scope(f"login:pair:{_digest(account)}:{where}", settings.LOGIN_FAILURES_PER_ACCOUNT),
    )


def _reserve(scope: Scope, now: float) -> int:
    """Count one attempt; 0 when it may go ahead, else the seconds to wait."""
    count = _incr(scope.key, _window())
    if count <= scope.free:
        return 0
    checked = cache.get(scope.key + ":checked") or 0
    delay = scope.delay(checked)
    if cache.add(scope.key + ":slot", now + delay, timeout=delay):
        _incr(scope.key + ":checked", _window())
        return 0
    until = cache.get(scope.key + ":slot") or now + 1
    return max(1, math.ceil(until - now))


def attempt(account: str, address: str) -> None:
    """Count a sign-in attempt before it is checked; ServiceError LOGIN_THROTTLED when it must wait.

    `account` names what is being guessed: the email for passwords,
    ``otp:<user id>`` for two-factor codes. Call :func:`succeeded` after a
    right answer and :func:`failed` after a wrong one.
    """
    now = time.time()
    for scope in scopes(account, address):
        wait = _reserve(scope, now)
        if wait:
            raise ServiceError(
                Code.LOGIN_THROTTLED,
                f"Too many failed sign-ins from your address; try again in {_words(wait)}.",
                headers={"Retry-After": str(wait)},
            )


def succeeded(account: str, address: str) -> None:
    """A right answer: forget the pair's count; this attempt was no failure of the address."""
    address_scope, pair = scopes(account, address)
    cache.delete_many([pair.key, pair.key + ":checked", pair.key + ":slot"])
    try:
        cache.decr(address_scope.key)
    except ValueError:  # the window ended meanwhile
        pass


def failed(account: str) -> int:
    """Count one wrong answer against the account (all addresses); the count in this window.

    Exactly one caller sees the count reach ``LOGIN_ALERT_AFTER`` (INCR is
    atomic), so the owner is emailed once per window, however many guess.
    """
    return _incr(f"login:account:{_digest(account)}", _window())


def count(account: str, address: str) -> int:
    """Attempts counted for the (account, address) pair in this window (for tests and support)."""
    return cache.get(scopes(account, address)[1].key) or 0


def _words(seconds: int) -> str:
    if seconds < 90:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    minutes = math.ceil(seconds / 60)
    return f"{minutes} minutes"


# --- password-reset requests ---------------------------------------------------


def reset_allowed(email: str, address: str) -> tuple[bool, bool]:
    """Count a reset request; (address within its limit, email within its limit) for this hour.

    A request over the address's limit is refused openly (that says nothing
    about the email); one over the email's limit gets the usual answer but no
    email, so nobody can flood an owner's mailbox with reset links.
    """
    hour = 60 * 60
    by_address = _incr(f"reset:addr:{_digest(network(address))}", hour)
    by_email = _incr(f"reset:email:{_digest(email)}", hour)
    return by_address <= settings.PASSWORD_RESETS_PER_ADDRESS, by_email <= settings.PASSWORD_RESETS_PER_EMAIL


# --- enrollment keys ----------------------------------------------------------------
# A key has ~190 bits and cannot be guessed; the limit keeps a script from
# hammering the endpoint anyway, and shows up in the audit log when it tries.


def _enroll_key(address: str) -> str:
    return "enroll-fail:address:" + hashlib.sha256(address.strip().lower().encode()).hexdigest()[:32]


def enroll_retry_after(address: str) -> int:
    """Seconds this address must wait before trying another enrollment key, else 0."""
    key = _enroll_key(address)
    if (cache.get(key) or 0) >= settings.ENROLL_FAILURES_PER_ADDRESS:
        started = cache.get(key + ":start") or time.time()
        return max(1, int(started + _window() - time.time()))
    return 0


def enroll_record_failure(address: str) -> None:
    """Count one bad enrollment key against the address."""
    key = _enroll_key(address)
    cache.add(key + ":start", time.time(), timeout=_window())
    cache.add(key, 0, timeout=_window())
    try:
        cache.incr(key)
    except ValueError:  # expired between add() and incr()
        cache.set(key, 1, timeout=_window())
