"""Telling owners when a server's agent is late or silent (backups.health)."""

from datetime import datetime

from django.db.models import F, Q
from django.utils import timezone

from accounts import notify

from ..health import schedule_health
from ..models import Server

BATCH = 500
ALERT_KINDS = ("late", "silent")


def overdue_notify(*, now: datetime | None = None) -> int:
    """Beat job: email owners of servers whose agent is late or silent; the number of emails sent.

    Only servers whose agent reports a schedule are looked at; nothing is
    inferred from the gaps between restore points. One email per incident:
    an incident is the time since the agent's last report, so a server is
    mailed again only after a new report (it ended the incident) and a new
    lapse. The mail is claimed with a conditional UPDATE first, so
    overlapping runs never send it twice.
    """
    now = now or timezone.now()
    sent = 0
    last_id = 0
    pending = Server.objects.exclude(schedule="").filter(status_at__isnull=False, user__is_active=True)
    # Already told about this report: skip in the query, most servers are fine or told.
    pending = pending.filter(Q(alerted_report_at__isnull=True) | ~Q(alerted_report_at=F("status_at")))
    while True:
        servers = list(pending.filter(pk__gt=last_id).select_related("user").order_by("pk")[:BATCH])
        if not servers:
            return sent
        last_id = servers[-1].pk
        for server in servers:
            health = schedule_health(server, now)
            if health.kind not in ALERT_KINDS:
                continue
            previous = server.alerted_report_at
            claim = Q(alerted_report_at__isnull=True) if previous is None else Q(alerted_report_at=previous)
            claimed = Server.objects.filter(claim, pk=server.pk, status_at=server.status_at).update(
                alerted_report_at=server.status_at
            )
            if not claimed:
                continue
            if _send(server, health):
                sent += 1
            else:
                Server.objects.filter(pk=server.pk, alerted_report_at=server.status_at).update(
                    alerted_report_at=previous
                )


def _send(server: Server, health) -> bool:
    """The late or silent email (templates/backups/email/overdue.txt); False when it could not be sent."""
    return notify.owner_email(server.user, "backups/email/overdue", {"server": server, "health": health})
