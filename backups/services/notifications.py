"""Telling owners when their servers stop sending backups."""

import logging
from datetime import datetime

from django.conf import settings
from django.core.mail import send_mail
from django.db.models import Q
from django.urls import reverse
from django.utils import timezone
from django.utils.timesince import timesince

from ..models import Server

log = logging.getLogger(__name__)

BATCH = 500


def overdue_notify(*, now: datetime | None = None) -> int:
    """Beat job: email owners of servers whose backups stopped arriving.

    A disk is overdue when its newest restore point is older than twice its
    usual interval (see selectors.disk_states). One email per silence: a
    server is mailed again only after a newer restore point arrived. The
    mail is claimed with a conditional UPDATE first, so overlapping runs
    never send it twice. Returns the number of emails sent.
    """
    from .. import selectors  # selectors import services; this breaks the cycle

    now = now or timezone.now()
    sent = 0
    last_id = 0
    while True:
        servers = list(Server.objects.filter(pk__gt=last_id).select_related("user").order_by("pk")[:BATCH])
        if not servers:
            return sent
        last_id = servers[-1].pk
        states = selectors.disk_states(server_ids=[s.pk for s in servers], now=now)
        for server in servers:
            overdue = sorted(
                (d for d in states.values() if d.server_id == server.pk and d.overdue), key=lambda d: d.disk
            )
            if not overdue or not server.user.is_active:
                continue
            # An overdue disk has a newest verified time: it is what it is overdue from.
            newest = max(d.newest_verified_at for d in overdue if d.newest_verified_at is not None)
            previous = server.overdue_notified_at
            if previous is not None and previous >= newest:
                continue  # already told about this silence
            claim = Q(overdue_notified_at__isnull=True) if previous is None else Q(overdue_notified_at=previous)
            if not Server.objects.filter(claim, pk=server.pk).update(overdue_notified_at=now):
                continue
            if _send(server, overdue, now):
                sent += 1
            else:
                Server.objects.filter(pk=server.pk, overdue_notified_at=now).update(overdue_notified_at=previous)


def _send(server: Server, disks: list, now: datetime) -> bool:
    lines = [
        f"- {d.disk}: last restore point {timesince(d.newest_verified_at, now)} ago (usually every {d.interval_words})"
        for d in disks
    ]
    body = (
        f"ReClo has not received backups of {server.name} for longer than twice their usual interval:\n\n"
        + "\n".join(lines)
        + "\n\nCheck that the server is running and that its agent can reach ReClo "
        "(`reclo-agent list` on the server shows what it last sent).\n\n"
        f"{settings.SITE_URL}{reverse('backups:server-detail', args=[server.pk])}\n"
    )
    try:
        send_mail(
            f"ReClo: backups of {server.name} are missing", body, settings.DEFAULT_FROM_EMAIL, [server.user.email]
        )
    except Exception:  # noqa: BLE001 - try again on the next run
        log.exception("could not email %s about %s", server.user.email, server.name)
        return False
    return True
