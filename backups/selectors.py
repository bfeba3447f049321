"""Tenant-scoped reads of servers and backups, shaped for the API and the pages.

Each selector runs a fixed number of queries whatever the number of
backups: the list joins its server, and the dashboard's per-disk figures
come from two grouped queries (aggregates, and the newest rows of each
disk through a window function).
"""

import statistics
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Count, F, Max, OuterRef, Q, Subquery, Sum, Window
from django.db.models.functions import RowNumber
from django.utils import timezone

from .chains import descendants_of, group_into_chains
from .models import Backup, Server

# How many recent restore points of a disk set its usual interval.
INTERVAL_SAMPLE = 10
MIN_INTERVAL = timedelta(minutes=5)
# Green while the newest restore point is younger than this many intervals
# (the next backup may be running); amber until OVERDUE_FACTOR; red beyond,
# which is also when the owner gets an email.
LATE_FACTOR = 1.5
OVERDUE_FACTOR = 2
TIMELINE_LIMIT = 500

HEALTH_ORDER = {"green": 0, "amber": 1, "red": 2}


def backup_list(*, user, server: str | None = None):
    """The user's backups, newest first, optionally of one server (by name); deleted ones are hidden."""
    qs = (
        Backup.objects.filter(user=user, deleted_at__isnull=True)
        .select_related("server")
        .order_by("-date_created", "-pk")
    )
    if server is not None:
        # The server's id first (one indexed lookup): filtering on a known id
        # lets the planner walk the (server, date, id) index for the page
        # instead of sorting the server's backups.
        server_id = Server.objects.filter(user=user, name=server).values_list("pk", flat=True).first()
        qs = qs.filter(server_id=server_id) if server_id is not None else qs.none()
    return qs


def backup_get(*, user, backup_id) -> Backup | None:
    """One of the user's backups, or None (also for another tenant's id, or a deleted one)."""
    try:
        return Backup.objects.select_related("server").get(user=user, pk=backup_id, deleted_at__isnull=True)
    except Backup.DoesNotExist:
        return None


def expected_interval(times: list[datetime]) -> timedelta | None:
    """The usual time between restore points: the median gap, or None with fewer than two."""
    times = sorted(set(times))
    if len(times) < 2:
        return None
    gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:], strict=False)]
    return max(MIN_INTERVAL, timedelta(seconds=statistics.median(gaps)))


def duration_words(span: timedelta) -> str:
    """A rough human length: "45 minutes", "1 hour", "6 hours", "2 days"."""
    minutes = round(span.total_seconds() / 60)
    for unit, size in (("day", 24 * 60), ("hour", 60)):
        if minutes >= size:
            count = round(minutes / size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{minutes} minute{'s' if minutes != 1 else ''}"


def health(*, newest_verified_at, newest_status, uploading: bool, interval: timedelta, now) -> tuple[str, str]:
    """(badge colour, words) for a disk: green on time, amber late, red missing or failed."""
    if newest_status == Backup.Status.FAILED:
        return "red", "last backup failed"
    if newest_verified_at is None:
        return ("amber", "first backup in progress") if uploading else ("red", "no restore point")
    age = now - newest_verified_at
    if age > interval * OVERDUE_FACTOR:
        return "red", "backups missing"
    if age > interval * LATE_FACTOR:
        return "amber", "late"
    return "green", "on schedule"


@dataclass
class DiskState:
    server_id: int
    disk: str
    restore_points: int = 0
    stored_bytes: int = 0
    uploading: bool = False
    newest_verified_at: datetime | None = None
    newest: dict | None = None  # the newest completed backup (any verdict)
    interval: timedelta = timedelta(0)
    interval_known: bool = False
    health: str = "red"
    health_label: str = ""
    # Restore points stopped arriving: none for OVERDUE_FACTOR intervals.
    overdue: bool = False

    @property
    def interval_words(self) -> str:
        return duration_words(self.interval)


def disk_states(*, server_ids: list[int], now: datetime | None = None) -> dict[tuple[int, str], DiskState]:
    """Figures and health of every disk of these servers, in two queries."""
    now = now or timezone.now()
    states: dict[tuple[int, str], DiskState] = {}
    if not server_ids:
        return states
    stored = Q(status__in=[Backup.Status.VERIFIED, Backup.Status.VERIFYING])
    aggregates = (
        Backup.objects.filter(server_id__in=server_ids, deleted_at__isnull=True)
        .values("server_id", "disk")
        .annotate(
            points=Count("pk", filter=Q(status=Backup.Status.VERIFIED)),
            stored=Sum("file_size", filter=stored),
            uploading=Count("pk", filter=Q(status__in=[Backup.Status.PENDING, Backup.Status.VERIFYING])),
            newest_verified=Max("date_created", filter=Q(status=Backup.Status.VERIFIED)),
        )
        .order_by()
    )
    for row in aggregates:
        states[row["server_id"], row["disk"]] = DiskState(
            server_id=row["server_id"],
            disk=row["disk"],
            restore_points=row["points"],
            stored_bytes=row["stored"] or 0,
            uploading=bool(row["uploading"]),
            newest_verified_at=row["newest_verified"],
        )
    recent = (
        Backup.objects.filter(server_id__in=server_ids, deleted_at__isnull=True)
        .exclude(status=Backup.Status.PENDING)
        .annotate(rank=Window(RowNumber(), partition_by=[F("server_id"), F("disk")], order_by=F("date_created").desc()))
        .filter(rank__lte=INTERVAL_SAMPLE + 1)
        .values("id", "server_id", "disk", "kind", "status", "date_created", "file_size", "failure", "rank")
    )
    verified_times: dict[tuple[int, str], list[datetime]] = {}
    for row in recent:
        key = (row["server_id"], row["disk"])
        if row["rank"] == 1:
            states[key].newest = row
        if row["status"] == Backup.Status.VERIFIED:
            verified_times.setdefault(key, []).append(row["date_created"])
    for key, state in states.items():
        interval = expected_interval(verified_times.get(key, []))
        state.interval_known = interval is not None
        state.interval = interval or settings.RECLO_DEFAULT_BACKUP_INTERVAL
        state.health, state.health_label = health(
            newest_verified_at=state.newest_verified_at,
            newest_status=state.newest["status"] if state.newest else None,
            uploading=state.uploading,
            interval=state.interval,
            now=now,
        )
        state.overdue = bool(
            state.newest_verified_at and now - state.newest_verified_at > state.interval * OVERDUE_FACTOR
        )
    return states


@dataclass
class ServerOverview:
    server: Server
    disks: list[DiskState] = field(default_factory=list)

    @property
    def health(self) -> str:
        return max((d.health for d in self.disks), key=HEALTH_ORDER.get, default="red")

    @property
    def health_label(self) -> str:
        if not self.disks:
            return "no restore point"
        worst = max(self.disks, key=lambda d: HEALTH_ORDER[d.health])
        return worst.health_label

    @property
    def newest_verified_at(self) -> datetime | None:
        return max((d.newest_verified_at for d in self.disks if d.newest_verified_at), default=None)

    @property
    def stored_bytes(self) -> int:
        return sum(d.stored_bytes for d in self.disks)


def server_overview(*, user, name: str | None = None) -> list[ServerOverview]:
    """The dashboard: each server of the user (or the one of that name) with its disks' figures and health."""
    servers = Server.objects.filter(user=user).order_by("name")
    if name is not None:
        servers = servers.filter(name=name)
    servers = list(servers)
    states = disk_states(server_ids=[s.pk for s in servers])
    by_server: dict[int, list[DiskState]] = {}
    for state in states.values():
        by_server.setdefault(state.server_id, []).append(state)
    return [ServerOverview(server=s, disks=sorted(by_server.get(s.pk, []), key=lambda d: d.disk)) for s in servers]


@dataclass
class DiskTimeline:
    state: DiskState
    chains: list[list[Backup]]  # newest chain first; each chain base first


def server_timeline(*, user, server_id: int) -> tuple[ServerOverview, list[DiskTimeline]] | None:
    """A server's restore points grouped by disk and chain, or None if not the user's.

    Shows the newest TIMELINE_LIMIT backups (retention keeps far fewer
    verified ones; failed ones add up until deleted).
    """
    server = Server.objects.filter(user=user, pk=server_id).first()
    if server is None:
        return None
    backups = list(server.backups.order_by("-date_created", "-pk")[:TIMELINE_LIMIT])
    backups.reverse()
    states = disk_states(server_ids=[server.pk])
    chains_by_disk = group_into_chains(backups)
    timelines = [
        # A disk whose restore points are all scheduled for removal has no figures.
        DiskTimeline(
            state=states.get((server.pk, disk)) or DiskState(server_id=server.pk, disk=disk),
            chains=list(reversed(chains)),
        )
        for disk, chains in sorted(chains_by_disk.items())
    ]
    overview = ServerOverview(server=server, disks=[t.state for t in timelines])
    return overview, timelines


def backup_delete_preview(*, user, backup_id) -> tuple[Backup, list[Backup]] | None:
    """A backup of the user and the restore points a cascading delete would take along."""
    backup = backup_get(user=user, backup_id=backup_id)
    if backup is None:
        return None
    rows = list(Backup.objects.filter(server_id=backup.server_id, disk=backup.disk, deleted_at__isnull=True))
    below = sorted((b for _, b in descendants_of(backup, rows)), key=lambda b: b.date_created, reverse=True)
    return backup, below


def server_credential_counts(*, server_ids: list[int]) -> dict[int, int]:
    """How many live server credentials each of these servers has (enrolled agents)."""
    from accounts.models import ApiToken

    rows = (
        ApiToken.objects.active()
        .filter(server_id__in=server_ids)
        .values("server_id")
        .annotate(n=Count("pk"))
        .order_by()
    )
    return {row["server_id"]: row["n"] for row in rows}


def newest_consistency(*, server_ids: list[int]) -> dict[int, str]:
    """Server id -> how its newest visible verified restore point was read (one query)."""
    newest = (
        Backup.objects.filter(server=OuterRef("pk"), status=Backup.Status.VERIFIED, deleted_at__isnull=True)
        .order_by("-date_created")
        .values("consistency")[:1]
    )
    rows = Server.objects.filter(pk__in=server_ids).annotate(newest=Subquery(newest)).values_list("pk", "newest")
    return {pk: value for pk, value in rows if value}
