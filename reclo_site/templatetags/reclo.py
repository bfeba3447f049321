"""Plain words and local time for templates: ``{% load reclo %}``.

- ``{{ value|when }}``: a time in the owner's zone with the zone named
  ("2 Dec 2026, 09:14 CET"); pages activate the zone (LocalTimeMiddleware),
  emails override it (accounts.notify.owner_email).
- ``{{ backup|point_kind }}``: "full copy" or "changes since 1 Dec, 22:00 CET".
- ``{{ status|plain_status }}``: what a restore point's status means.
- ``{{ event|sentence }}``: an audit event as a sentence.
"""

from datetime import UTC

from django import template
from django.utils import timezone

from reclo_site.localtime import when as _when

register = template.Library()

# What a restore point's status means to its owner.
STATUS_WORDS = {
    "pending": "uploading",
    "verifying": "being checked",
    "verified": "ready to restore",
    "failed": "failed",
}


@register.filter
def when(value, arg=""):
    """A datetime in the active zone, with the zone named; ``|when:"seconds"`` adds seconds."""
    return _when(value, timezone.get_current_timezone(), seconds=arg == "seconds")


@register.filter
def iso(value):
    """The machine-readable UTC time for a <time datetime=...> attribute."""
    return value.astimezone(UTC).isoformat() if value else ""


@register.filter
def point_kind(backup):
    """A restore point's kind in plain words: "full copy" or "changes since <its parent>"."""
    if getattr(backup, "kind", "") == "full":
        return "full copy"
    # Only a parent already at hand (server_timeline caches them): never a query per row.
    field = backup._meta.get_field("parent") if hasattr(backup, "_meta") else None
    parent = backup.parent if field is not None and field.is_cached(backup) else None
    if parent is not None and getattr(parent, "date_created", None):
        return f"changes since {_when(parent.date_created, timezone.get_current_timezone())}"
    return "changes since the one before"


@register.filter
def plain_status(status):
    """A restore point's status as its owner would say it."""
    return STATUS_WORDS.get(str(status), str(status))


@register.filter
def sentence(event):
    """An audit event in plain words (accounts.activity)."""
    from accounts.activity import event_sentence

    return event_sentence(event)


@register.filter
def warning_event(event):
    """Whether an audit event deserves a second look (a red badge)."""
    from accounts.activity import WARNING_KINDS

    return event.kind in WARNING_KINDS
