"""The owner's time zone: which one, and times written in it with the zone named."""

import zoneinfo
from datetime import UTC, datetime, tzinfo
from functools import lru_cache

from django.utils import timezone


@lru_cache(maxsize=1)
def zone_names() -> frozenset[str]:
    """Every IANA zone name this system knows (the choices for a user's zone)."""
    return frozenset(zoneinfo.available_timezones()) | {"UTC"}


def valid_zone(name: str) -> bool:
    """Whether `name` is a zone we can show times in."""
    return name in zone_names()


def user_zone(user) -> tzinfo:
    """The zone `user` reads times in; UTC for anyone without a valid one."""
    name = getattr(user, "time_zone", "") or "UTC"
    if name == "UTC" or not valid_zone(name):
        return UTC
    return zoneinfo.ZoneInfo(name)


def when(value: datetime | None, zone=None, *, seconds: bool = False) -> str:
    """`value` in `zone` (default: the active one) as "2 Dec 2026, 09:14 CET".

    `value` may be an ISO 8601 string (from a JSON field); other strings are given back as they are.

    The zone's abbreviation names it; where a zone has none (many print an
    offset such as "+04"), the offset is written "UTC+04".
    """
    if isinstance(value, str) and value:
        try:  # a time kept in a JSON field (a drill's resources), as ISO 8601
            value = datetime.fromisoformat(value)
        except ValueError:
            return value
    if not isinstance(value, datetime):  # None, or a template's empty string for a missing value
        return "" if not value else str(value)
    local = timezone.localtime(value, zone) if timezone.is_aware(value) else value
    fmt = "%-d %b %Y, %H:%M:%S" if seconds else "%-d %b %Y, %H:%M"
    abbreviation = local.strftime("%Z") or "UTC"
    if abbreviation[0] in "+-":
        abbreviation = f"UTC{abbreviation}"
    return f"{local.strftime(fmt)} {abbreviation}"
